//! The request head of a connection's first request, read and bounded before hyper sees
//! it.
//!
//! Why not hyper alone: hyper buffers a request head up to its `max_buf_size` (about
//! 400 KiB by default) and answers an oversized one with an empty 431. A client that
//! sends a long head and never finishes it then holds that much memory per connection
//! until the header timeout, and with the HTTP-phase budget (4,096 connections) that is
//! gigabytes. So the first head is read here, into a buffer that grows only as bytes
//! arrive and never past `HERALD_MAX_REQUEST_HEAD_BYTES`; a head over it gets a 431 with
//! the same JSON error body as every other HTTP error. What was read is handed to hyper
//! in front of the socket ([`Prefixed`]). Later requests on a keep-alive connection are
//! bounded by hyper's own buffer, set to the same size (there, the 431 is hyper's and
//! has no body: the first request, the one that matters for a WebSocket, always gets
//! the JSON one).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use herald_protocol::codes::ErrorCode;
use herald_protocol::frame::ErrorBody;
use tokio::io::{AsyncRead, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

/// The first read of a head takes at most this much; the buffer doubles from there.
const FIRST_READ: usize = 1_024;

/// How reading the first request head ended.
#[derive(Debug)]
pub enum Head {
    /// Complete (the bytes read, which may go on past the head).
    Complete(Vec<u8>),
    /// Over the limit: answered 431.
    TooLarge,
    /// The client closed before a whole head, or the socket failed.
    Closed,
}

/// The offset just past the blank line that ends a head in `buf`, looking from `from`
/// (an offset already known to contain no end).
pub fn head_end(buf: &[u8], from: usize) -> Option<usize> {
    let start = from.saturating_sub(3);
    buf.get(start..)?
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| start + i + 4)
}

/// The capacity to grow a head buffer of capacity `cap` to, with `max` the limit: the
/// buffer holds at most `max + 1` bytes, one more than a head may have, so a head over
/// the limit is seen without reading further.
pub fn next_capacity(cap: usize, max: usize) -> usize {
    (cap.max(FIRST_READ / 2) * 2).min(max + 1)
}

/// Reads the first request head from `stream` into `buf`, up to `max` bytes. Waits
/// for the socket to be readable before allocating anything, so a silent connection
/// holds no buffer. `buf` keeps what was read if the future is dropped, so a reader
/// that is cancelled (an evicted connection) can go on where it stopped.
pub async fn read_into(stream: &mut TcpStream, buf: &mut Vec<u8>, max: usize) -> Head {
    if let Some(end) = head_end(buf, 0) {
        if end <= max {
            return Head::Complete(std::mem::take(buf));
        }
    }
    loop {
        if stream.readable().await.is_err() {
            return Head::Closed;
        }
        if buf.len() == buf.capacity() {
            let want = next_capacity(buf.capacity(), max);
            buf.reserve_exact(want - buf.len());
        }
        let before = buf.len();
        match stream.try_read_buf(buf) {
            Ok(0) => return Head::Closed,
            Ok(_) => {
                if let Some(end) = head_end(buf, before) {
                    if end <= max {
                        return Head::Complete(std::mem::take(buf));
                    }
                }
                if buf.len() > max {
                    too_large(stream, max).await;
                    return Head::TooLarge;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(_) => return Head::Closed,
        }
    }
}

/// The 431 of a head over `max` bytes, then the end of the connection.
async fn too_large(stream: &mut TcpStream, max: usize) {
    let body = serde_json::json!({
        "error": ErrorBody::new(
            ErrorCode::TooLarge,
            format!("request head over {max} bytes (HERALD_MAX_REQUEST_HEAD_BYTES)"),
        )
    })
    .to_string();
    let response = format!(
        "HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: application/json\r\n\
         content-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.write_all(response.as_bytes()).await;
    let _ = stream.shutdown().await;
}

/// The socket with the bytes already read in front of it.
pub struct Prefixed {
    /// Read but not yet handed on; `None` once handed on, so the buffer is freed.
    prefix: Option<Box<[u8]>>,
    at: usize,
    inner: TcpStream,
}

impl Prefixed {
    /// `inner`, read from after `prefix`.
    pub fn new(prefix: Vec<u8>, inner: TcpStream) -> Self {
        Self {
            prefix: (!prefix.is_empty()).then(|| prefix.into_boxed_slice()),
            at: 0,
            inner,
        }
    }
}

impl AsyncRead for Prefixed {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Some(prefix) = &this.prefix {
            let rest = &prefix[this.at..];
            let n = rest.len().min(buf.remaining());
            buf.put_slice(&rest[..n]);
            this.at += n;
            if this.at == prefix.len() {
                this.prefix = None;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

/// `AsyncWrite` for a socket wrapper that changes only how the socket is read: every
/// write goes to its field `inner` as it is, vectored writes included (hyper and
/// tungstenite use them).
macro_rules! forward_writes {
    (impl $(<$g:ident>)? for $t:ty) => {
        impl$(<$g: tokio::io::AsyncWrite + Unpin>)? tokio::io::AsyncWrite for $t {
            fn poll_write(
                self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
                buf: &[u8],
            ) -> std::task::Poll<std::io::Result<usize>> {
                std::pin::Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
            }

            fn poll_write_vectored(
                self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
                bufs: &[std::io::IoSlice<'_>],
            ) -> std::task::Poll<std::io::Result<usize>> {
                std::pin::Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
            }

            fn is_write_vectored(&self) -> bool {
                self.inner.is_write_vectored()
            }

            fn poll_flush(
                self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
            ) -> std::task::Poll<std::io::Result<()>> {
                std::pin::Pin::new(&mut self.get_mut().inner).poll_flush(cx)
            }

            fn poll_shutdown(
                self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
            ) -> std::task::Poll<std::io::Result<()>> {
                std::pin::Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
            }
        }
    };
}
pub(crate) use forward_writes;

forward_writes!(impl for Prefixed);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_end_of_a_head_is_found_across_reads() {
        let head = b"GET / HTTP/1.1\r\nHost: x\r\n\r\nrest";
        assert_eq!(head_end(head, 0), Some(head.len() - 4));
        // The blank line split over two reads: the scan looks back three bytes.
        let first = b"GET / HTTP/1.1\r\nHost: x\r\n\r".len();
        assert_eq!(head_end(head, first), Some(head.len() - 4));
        assert_eq!(head_end(b"GET / HTTP/1.1\r\nHost: x\r\n", 0), None);
        assert_eq!(head_end(b"", 0), None);
    }

    #[test]
    fn the_buffer_grows_by_doubling_to_one_past_the_limit() {
        let max = 32_768;
        let mut cap = 0;
        let mut steps = Vec::new();
        while cap <= max {
            cap = next_capacity(cap, max);
            steps.push(cap);
        }
        assert_eq!(steps, [1_024, 2_048, 4_096, 8_192, 16_384, 32_768, 32_769]);
        assert_eq!(next_capacity(0, 8_192), 1_024);
    }
}
