//! The socket a session talks over: any `Sink` of messages and `Stream` of frames, as
//! axum's testing-websockets example has it. The node hands in the upgraded connection
//! (tokio-tungstenite's stream over the frame-counting [`Guarded`](super::frames::Guarded)
//! socket); the unit tests hand in a pair of channels ([`pair`]), so the session's
//! rules can be tested without a network.

use futures_util::{Sink, Stream};
use tungstenite::Message;

/// A WebSocket as the session sees it.
pub(crate) trait Socket:
    Sink<Message, Error = tungstenite::Error>
    + Stream<Item = Result<Message, tungstenite::Error>>
    + Unpin
    + Send
{
}

impl<T> Socket for T where
    T: Sink<Message, Error = tungstenite::Error>
        + Stream<Item = Result<Message, tungstenite::Error>>
        + Unpin
        + Send
{
}

#[cfg(test)]
pub(crate) use fake::{pair, Client};

#[cfg(test)]
mod fake {
    use std::pin::Pin;
    use std::task::{Context, Poll};

    use futures_util::{Sink, Stream};
    use tokio::sync::mpsc;
    use tungstenite::Message;

    /// The server's end of a [`pair`].
    pub(crate) struct Fake {
        to_client: mpsc::UnboundedSender<Message>,
        from_client: mpsc::UnboundedReceiver<Result<Message, tungstenite::Error>>,
    }

    /// The client's end of a [`pair`]: what the session wrote, and a way to send it frames.
    pub(crate) struct Client {
        /// Frames the session sent, in order.
        pub(crate) rx: mpsc::UnboundedReceiver<Message>,
        /// Frames for the session.
        pub(crate) tx: mpsc::UnboundedSender<Result<Message, tungstenite::Error>>,
    }

    /// A socket made of two channels.
    pub(crate) fn pair() -> (Client, Fake) {
        let (to_client, rx) = mpsc::unbounded_channel();
        let (tx, from_client) = mpsc::unbounded_channel();
        (
            Client { rx, tx },
            Fake {
                to_client,
                from_client,
            },
        )
    }

    impl Sink<Message> for Fake {
        type Error = tungstenite::Error;

        fn poll_ready(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Result<(), tungstenite::Error>> {
            Poll::Ready(Ok(()))
        }

        fn start_send(self: Pin<&mut Self>, item: Message) -> Result<(), tungstenite::Error> {
            // A client that went away just drops what it is sent, like a closed socket.
            let _ = self.to_client.send(item);
            Ok(())
        }

        fn poll_flush(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Result<(), tungstenite::Error>> {
            Poll::Ready(Ok(()))
        }

        fn poll_close(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Result<(), tungstenite::Error>> {
            Poll::Ready(Ok(()))
        }
    }

    impl Stream for Fake {
        type Item = Result<Message, tungstenite::Error>;

        fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
            self.from_client.poll_recv(cx)
        }
    }
}
