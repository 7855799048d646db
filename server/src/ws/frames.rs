//! Every frame a client sends, counted below the WebSocket library.
//!
//! tungstenite hands the session whole messages: the frames of a fragmented message,
//! and pings and pongs, never reach it. So a client could send tens of millions of
//! empty continuation frames (a message that never ends), each one parsed and
//! buffered, and nothing above the library would see a command to count. [`Guarded`]
//! sits between the socket and tungstenite and follows the frame boundaries in the
//! bytes as they are read ([`FrameMeter`], a pure state machine). It closes the
//! connection when
//! - more than the frame rate arrive within one second, of any kind and in any state
//!   (close 4429);
//! - a fragmented message has more than [`MAX_FRAGMENTS`] frames (close 1009, like a
//!   message over the size limit, which tungstenite already enforces);
//! - a fragmented message is still unfinished [`FRAGMENT_TIMEOUT`] after its first
//!   frame (close 4408). The time is checked as frames arrive; a client that goes
//!   silent in the middle of a message meets the hello timeout or the heartbeat.
//!
//! The meter is about 40 bytes per connection and costs a few comparisons per read.

use std::io;
use std::pin::Pin;
use std::sync::OnceLock;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use herald_protocol::codes::CloseCode;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};

/// Frames one fragmented message may have.
pub const MAX_FRAGMENTS: u16 = 64;

/// How long a fragmented message may take from its first frame to its last.
pub const FRAGMENT_TIMEOUT: Duration = Duration::from_secs(5);

/// Which bound a client broke.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Violation {
    /// More frames within a second than the frame rate.
    #[error("more frames per second than the frame rate")]
    Rate,
    /// A fragmented message with more than [`MAX_FRAGMENTS`] frames.
    #[error("a fragmented message with more than {MAX_FRAGMENTS} frames")]
    Fragments,
    /// A fragmented message unfinished after [`FRAGMENT_TIMEOUT`].
    #[error("a fragmented message unfinished after {FRAGMENT_TIMEOUT:?}")]
    FragmentTimeout,
}

impl Violation {
    /// The close code that tells the client.
    pub fn close_code(self) -> CloseCode {
        match self {
            Violation::Rate => CloseCode::TooMany,
            Violation::Fragments => CloseCode::TooLarge,
            Violation::FragmentTimeout => CloseCode::Timeout,
        }
    }
}

/// Follows frame boundaries in a client's byte stream and counts frames.
#[derive(Debug)]
pub struct FrameMeter {
    /// The header of the frame being read, so far.
    header: [u8; 14],
    have: u8,
    /// Payload bytes of the current frame still to come (0: reading a header).
    payload_left: u64,
    per_sec: u32,
    /// Frames in the current one-second window, and when it began (ms ticks).
    in_window: u32,
    window_start: u32,
    /// Frames of the fragmented message in progress (0: none), and when it began.
    fragments: u16,
    message_start: u32,
}

impl FrameMeter {
    /// A meter allowing `per_sec` frames per second.
    pub fn new(per_sec: u32) -> Self {
        Self {
            header: [0; 14],
            have: 0,
            payload_left: 0,
            per_sec,
            in_window: 0,
            window_start: 0,
            fragments: 0,
            message_start: 0,
        }
    }

    /// Takes the bytes read at `now_ms` (a millisecond clock).
    pub fn feed(&mut self, mut bytes: &[u8], now_ms: u32) -> Result<(), Violation> {
        while !bytes.is_empty() {
            if self.payload_left > 0 {
                let skip = usize::try_from(self.payload_left)
                    .unwrap_or(usize::MAX)
                    .min(bytes.len());
                bytes = &bytes[skip..];
                self.payload_left -= skip as u64;
                continue;
            }
            let need = header_len(&self.header[..usize::from(self.have)]);
            let have = usize::from(self.have);
            let take = (need - have).min(bytes.len());
            self.header[have..have + take].copy_from_slice(&bytes[..take]);
            self.have += take as u8;
            bytes = &bytes[take..];
            // The length of a header is only known from its second byte on.
            if usize::from(self.have) == header_len(&self.header[..usize::from(self.have)]) {
                self.frame(now_ms)?;
            }
        }
        Ok(())
    }

    /// A whole header has arrived: count the frame.
    fn frame(&mut self, now_ms: u32) -> Result<(), Violation> {
        let (fin, opcode, len) = parse_header(&self.header[..usize::from(self.have)]);
        self.have = 0;
        self.payload_left = len;
        if now_ms.wrapping_sub(self.window_start) >= 1_000 {
            self.window_start = now_ms;
            self.in_window = 0;
        }
        self.in_window += 1;
        if self.in_window > self.per_sec {
            return Err(Violation::Rate);
        }
        match opcode {
            // The first frame of a text or binary message.
            1 | 2 if !fin => {
                self.fragments = 1;
                self.message_start = now_ms;
            }
            1 | 2 => self.fragments = 0,
            0 if self.fragments > 0 => {
                self.fragments = self.fragments.saturating_add(1);
                if self.fragments > MAX_FRAGMENTS {
                    return Err(Violation::Fragments);
                }
                if fin {
                    self.fragments = 0;
                }
            }
            // A stray continuation: tungstenite refuses it (4400).
            _ => {}
        }
        if self.fragments > 0
            && u128::from(now_ms.wrapping_sub(self.message_start)) > FRAGMENT_TIMEOUT.as_millis()
        {
            return Err(Violation::FragmentTimeout);
        }
        Ok(())
    }
}

/// The length of the header that starts with `start` (2 until its second byte is known).
fn header_len(start: &[u8]) -> usize {
    let Some(&second) = start.get(1) else {
        return 2;
    };
    let ext = match second & 0x7f {
        126 => 2,
        127 => 8,
        _ => 0,
    };
    let mask = if second & 0x80 != 0 { 4 } else { 0 };
    2 + ext + mask
}

/// FIN, opcode and payload length of a whole header.
fn parse_header(h: &[u8]) -> (bool, u8, u64) {
    let fin = h[0] & 0x80 != 0;
    let opcode = h[0] & 0x0f;
    let len = match h[1] & 0x7f {
        126 => u64::from(u16::from_be_bytes([h[2], h[3]])),
        127 => u64::from_be_bytes([h[2], h[3], h[4], h[5], h[6], h[7], h[8], h[9]]),
        n => u64::from(n),
    };
    (fin, opcode, len)
}

/// Milliseconds since the first call, wrapping after 49 days (the meter compares
/// differences only).
fn now_ms() -> u32 {
    static START: OnceLock<Instant> = OnceLock::new();
    let start = *START.get_or_init(Instant::now);
    start.elapsed().as_millis() as u32
}

/// The error a [`Guarded`] read returns once a bound is broken.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct FrameLimit(pub Violation);

/// Which bound, if the error of a read is a [`FrameLimit`].
pub fn violation(e: &io::Error) -> Option<Violation> {
    e.get_ref()?.downcast_ref::<FrameLimit>().map(|f| f.0)
}

/// A socket whose reads go through a [`FrameMeter`].
pub struct Guarded<S> {
    inner: S,
    meter: FrameMeter,
    /// Set once a bound is broken: every read fails from then on, and
    /// [`linger`](Self::linger) drains the socket after the close frame.
    broken: Option<Violation>,
}

impl<S> Guarded<S> {
    /// `inner`, allowing `per_sec` frames per second.
    pub fn new(inner: S, per_sec: u32) -> Self {
        Self {
            inner,
            meter: FrameMeter::new(per_sec),
            broken: None,
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Guarded<S> {
    /// After a broken bound, once the close frame is sent: ends the write side and
    /// reads (and drops) what the client still sends, up to its end or `wait`. A
    /// socket dropped with unread bytes is reset, and the reset can destroy the close
    /// frame before the client reads it. Does nothing if no bound was broken.
    pub async fn linger(&mut self, wait: Duration) {
        if self.broken.is_none() {
            return;
        }
        let _ = tokio::time::timeout(wait, async {
            self.inner.shutdown().await?;
            let mut scratch = [0u8; 1_024];
            while self.inner.read(&mut scratch).await? > 0 {}
            Ok::<_, io::Error>(())
        })
        .await;
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Guarded<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Some(v) = this.broken {
            return Poll::Ready(Err(io::Error::other(FrameLimit(v))));
        }
        let before = buf.filled().len();
        let result = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = result {
            if let Err(v) = this.meter.feed(&buf.filled()[before..], now_ms()) {
                this.broken = Some(v);
                buf.set_filled(before);
                return Poll::Ready(Err(io::Error::other(FrameLimit(v))));
            }
        }
        result
    }
}

crate::listener::head::forward_writes!(impl<S> for Guarded<S>);

#[cfg(test)]
mod tests {
    use super::*;

    /// A masked client frame with `payload` (the mask is zero: the meter never unmasks).
    fn frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
        let mut f = vec![if fin { 0x80 } else { 0 } | opcode];
        match payload.len() {
            n if n < 126 => f.push(0x80 | n as u8),
            n if n <= 0xffff => {
                f.push(0x80 | 126);
                f.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                f.push(0x80 | 127);
                f.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        f.extend_from_slice(&[0; 4]);
        f.extend_from_slice(payload);
        f
    }

    #[test]
    fn frames_are_counted_whatever_the_reads_look_like() {
        let mut bytes = Vec::new();
        bytes.extend(frame(true, 1, b"{\"type\":\"hello\"}"));
        bytes.extend(frame(true, 9, b""));
        bytes.extend(frame(true, 2, &vec![7; 300]));
        bytes.extend(frame(true, 1, &vec![b'x'; 70_000]));
        // One read, and one byte per read: the same four frames.
        let mut whole = FrameMeter::new(100);
        whole.feed(&bytes, 0).unwrap();
        assert_eq!(whole.in_window, 4);
        let mut bytewise = FrameMeter::new(100);
        for b in &bytes {
            bytewise.feed(std::slice::from_ref(b), 0).unwrap();
        }
        assert_eq!(bytewise.in_window, 4);
        assert_eq!((bytewise.have, bytewise.payload_left), (0, 0));
    }

    #[test]
    fn more_frames_than_the_rate_within_a_second_break_it() {
        let mut m = FrameMeter::new(3);
        let ping = frame(true, 9, b"");
        for _ in 0..3 {
            m.feed(&ping, 10).unwrap();
        }
        assert_eq!(m.feed(&ping, 999), Err(Violation::Rate));
        // A new second, a new window.
        let mut m = FrameMeter::new(3);
        for t in [0, 500, 999, 1_000, 1_500, 1_999] {
            m.feed(&ping, t).unwrap();
        }
    }

    #[test]
    fn empty_continuations_are_frames_too() {
        let mut m = FrameMeter::new(1_000_000);
        m.feed(&frame(false, 1, b"{"), 0).unwrap();
        let cont = frame(false, 0, b"");
        for _ in 1..MAX_FRAGMENTS {
            m.feed(&cont, 0).unwrap();
        }
        assert_eq!(m.feed(&cont, 0), Err(Violation::Fragments));
    }

    #[test]
    fn a_fragmented_message_has_a_deadline() {
        let mut m = FrameMeter::new(1_000);
        m.feed(&frame(false, 1, b"{"), 0).unwrap();
        m.feed(&frame(false, 0, b"\"a\""), 4_000).unwrap();
        // A pong in between is checked against the message's deadline too.
        assert_eq!(
            m.feed(&frame(true, 10, b""), 5_001),
            Err(Violation::FragmentTimeout)
        );
        // Finished in time, the next message starts afresh.
        let mut m = FrameMeter::new(1_000);
        m.feed(&frame(false, 1, b"{"), 0).unwrap();
        m.feed(&frame(true, 0, b"}"), 4_999).unwrap();
        m.feed(&frame(true, 10, b""), 60_000).unwrap();
        m.feed(&frame(true, 1, b"{}"), 60_001).unwrap();
    }

    #[test]
    fn a_violation_maps_to_its_close_code() {
        assert_eq!(Violation::Rate.close_code(), CloseCode::TooMany);
        assert_eq!(Violation::Fragments.close_code(), CloseCode::TooLarge);
        assert_eq!(Violation::FragmentTimeout.close_code(), CloseCode::Timeout);
        let e = io::Error::other(FrameLimit(Violation::Rate));
        assert_eq!(violation(&e), Some(Violation::Rate));
        assert_eq!(violation(&io::Error::other("no")), None);
    }
}
