//! Response bodies: whole (JSON documents) or streamed from a channel (JSON lines).
use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt as _, Full};
use tokio::sync::mpsc;

pub type ApiBody = BoxBody<Bytes, Infallible>;

pub fn full(bytes: impl Into<Bytes>) -> ApiBody {
    Full::new(bytes.into()).boxed()
}

/// A body fed chunk by chunk; it ends when every sender is dropped. When the client goes away
/// hyper drops the body, and the sender sees `closed()`.
pub struct ChannelBody {
    rx: mpsc::Receiver<Bytes>,
}

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.rx.poll_recv(cx).map(|chunk| chunk.map(|bytes| Ok(Frame::data(bytes))))
    }
}

/// A streamed body and the sender that feeds it (`capacity` chunks in flight).
pub fn channel(capacity: usize) -> (mpsc::Sender<Bytes>, ApiBody) {
    let (tx, rx) = mpsc::channel(capacity.max(1));
    (tx, ChannelBody { rx }.boxed())
}
