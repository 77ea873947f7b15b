//! The `request_response` codec: frames on libp2p streams.
//!
//! Requests are encoded by the caller's task and replies by the responder's
//! task, so the swarm task only moves bytes. A bad inbound frame is not an
//! I/O error here: it becomes a typed error the endpoint answers with a
//! [`Refusal`], so the sender learns why and the connection stays up.

use std::io;
use std::time::Duration;

use futures::{AsyncRead, AsyncWrite, AsyncWriteExt};
use libp2p::StreamProtocol;
use libp2p::request_response;
use tokio::sync::oneshot;

use crate::frame::{self, Reply};
use crate::message::{Message, Refusal, RefusalCode};
use crate::{Error, Result};

/// A request as the codec sees it.
// Moved once per request; boxing the large variant would cost an allocation.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub(crate) enum Req {
    /// An outbound request, already framed.
    Frame(Vec<u8>),
    /// An inbound request: the message, or why its frame was bad.
    Received(Result<Message>),
}

/// A reply as the codec sees it.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub(crate) enum Resp {
    /// An outbound reply the application has not produced yet.
    Pending(oneshot::Receiver<Vec<u8>>),
    /// An outbound reply, already framed.
    Frame(Vec<u8>),
    /// An inbound reply: the peer's answer, or why its frame was bad.
    Received(Result<Reply>),
}

#[derive(Debug, Clone)]
pub(crate) struct WireCodec {
    pub(crate) max_frame: usize,
    pub(crate) read_timeout: Duration,
}

/// Frames a refusal. Refusals are tiny, so this cannot hit the frame limit.
pub(crate) fn refusal_frame(code: RefusalCode, detail: impl Into<String>) -> Vec<u8> {
    let reply: Reply = Err(Refusal::new(code, detail));
    frame::encode_frame(&reply, usize::MAX).unwrap_or_default()
}

async fn write_all<T: AsyncWrite + Unpin>(io: &mut T, frame: &[u8]) -> io::Result<()> {
    if frame.is_empty() {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "empty frame"));
    }
    io.write_all(frame).await?;
    io.flush().await
}

impl request_response::Codec for WireCodec {
    type Protocol = StreamProtocol;
    type Request = Req;
    type Response = Resp;

    async fn read_request<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<Req>
    where
        T: AsyncRead + Unpin + Send,
    {
        let read = frame::read_body(io, self.max_frame);
        let body = match tokio::time::timeout(self.read_timeout, read).await {
            Err(_) => return Ok(Req::Received(Err(Error::ReadTimeout(self.read_timeout)))),
            // The stream itself broke: nobody is left to answer.
            Ok(Err(Error::Io(e))) => return Err(e),
            Ok(Err(e)) => return Ok(Req::Received(Err(e))),
            Ok(Ok(body)) => body,
        };
        Ok(Req::Received(frame::decode_message(&body)))
    }

    async fn read_response<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<Resp>
    where
        T: AsyncRead + Unpin + Send,
    {
        // The behaviour's request timeout bounds this read.
        match frame::read_body(io, self.max_frame).await {
            Ok(body) => Ok(Resp::Received(frame::decode_reply(&body))),
            Err(Error::Io(e)) => Err(e),
            Err(e) => Ok(Resp::Received(Err(e))),
        }
    }

    async fn write_request<T>(&mut self, _: &StreamProtocol, io: &mut T, req: Req) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        match req {
            Req::Frame(frame) => write_all(io, &frame).await,
            Req::Received(_) => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "a received request cannot be sent",
            )),
        }
    }

    async fn write_response<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        resp: Resp,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        let frame = match resp {
            Resp::Frame(frame) => frame,
            // A dropped responder still owes the sender an answer.
            Resp::Pending(rx) => rx.await.unwrap_or_else(|_| {
                refusal_frame(RefusalCode::NoReply, "the receiver dropped the request")
            }),
            Resp::Received(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "a received reply cannot be sent",
                ));
            }
        };
        write_all(io, &frame).await
    }
}
