//! The `request_response` codec: frames on libp2p streams.
//!
//! Requests are encoded by the caller's task and replies by the responder's
//! task, so the swarm task only moves bytes. A bad inbound frame is not an
//! I/O error here: it becomes a typed error the endpoint answers with a
//! [`Refusal`], so the sender learns why and the connection stays up.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use futures::{AsyncRead, AsyncWrite, AsyncWriteExt};
use libp2p::StreamProtocol;
use libp2p::request_response;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, oneshot};

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
    /// An inbound request: the message, or why its frame was bad, and the
    /// share of the large-frame budget it holds until it is answered.
    Received(Result<Message>, Option<OwnedSemaphorePermit>),
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

/// Frames up to this size are read without the large-frame budget (the
/// requests of a two-party payment channel are a few hundred bytes); their
/// number is capped by the streams per connection and the requests per
/// peer (DESIGN §6).
pub(crate) const SMALL_FRAME: usize = 16 * 1024;

/// Bytes of large inbound frames held at once, over all connections and
/// both protocols: from their length prefix until they are answered.
#[derive(Debug, Clone)]
pub(crate) struct LargeFrames {
    pub(crate) budget: Arc<Semaphore>,
    /// The budget's size, for the error.
    pub(crate) bytes: usize,
}

impl LargeFrames {
    pub(crate) fn new(bytes: usize) -> Self {
        let bytes = bytes.min(Semaphore::MAX_PERMITS);
        Self {
            budget: Arc::new(Semaphore::new(bytes)),
            bytes,
        }
    }

    /// A frame of `len` bytes: a small one needs nothing, a large one takes
    /// its size from the budget or is `Busy`.
    pub(crate) fn take(&self, len: usize) -> Result<Option<OwnedSemaphorePermit>> {
        if len <= SMALL_FRAME {
            return Ok(None);
        }
        let busy = || Error::Busy {
            what: "bytes of large inbound frames",
            limit: self.bytes,
        };
        let n = u32::try_from(len).map_err(|_| busy())?;
        let permit = self.budget.clone().try_acquire_many_owned(n);
        permit.map(Some).map_err(|_| busy())
    }
}

#[derive(Debug, Clone)]
pub(crate) struct WireCodec {
    pub(crate) max_frame: usize,
    pub(crate) read_timeout: Duration,
    pub(crate) large_frames: LargeFrames,
}

impl WireCodec {
    /// Reads one request frame; a large one first takes its size from the
    /// budget, or is refused `Busy` without reading its body.
    async fn read_admitted<T: AsyncRead + Unpin>(
        &self,
        io: &mut T,
    ) -> Result<(Vec<u8>, Option<OwnedSemaphorePermit>)> {
        let len = frame::read_len(io, self.max_frame).await?;
        let permit = self.large_frames.take(len)?;
        Ok((frame::read_exact_body(io, len).await?, permit))
    }
}

/// Frames a refusal. Refusals are tiny, so this cannot hit the frame limit.
pub(crate) fn refusal_frame(code: RefusalCode, detail: impl Into<String>) -> Vec<u8> {
    let reply: Reply = Err(Refusal::new(code, detail));
    frame::encode_frame(&reply, usize::MAX).unwrap_or_default()
}

/// Frames a refusal on a lane, under its request's `id`.
pub(crate) fn tagged_refusal(id: u64, code: RefusalCode, detail: impl Into<String>) -> Vec<u8> {
    let reply: Reply = Err(Refusal::new(code, detail));
    frame::encode_tagged(id, &reply, usize::MAX).unwrap_or_default()
}

/// What a request whose frame could not be read is refused with, on
/// either protocol.
pub(crate) fn refusal_code(e: &Error) -> RefusalCode {
    match e {
        Error::FrameTooLarge { .. } => RefusalCode::TooLarge,
        Error::ReadTimeout(_) => RefusalCode::Stalled,
        Error::Busy { .. } => RefusalCode::Busy,
        _ => RefusalCode::Malformed,
    }
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
        let read = self.read_admitted(io);
        let (body, permit) = match tokio::time::timeout(self.read_timeout, read).await {
            Err(_) => {
                return Ok(Req::Received(
                    Err(Error::ReadTimeout(self.read_timeout)),
                    None,
                ));
            }
            // The stream itself broke: nobody is left to answer.
            Ok(Err(Error::Io(e))) => return Err(e),
            Ok(Err(e)) => return Ok(Req::Received(Err(e), None)),
            Ok(Ok(read)) => read,
        };
        match frame::decode_message(&body) {
            Ok(msg) => Ok(Req::Received(Ok(msg), permit)),
            Err(e) => Ok(Req::Received(Err(e), None)),
        }
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
            Req::Received(..) => Err(io::Error::new(
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
