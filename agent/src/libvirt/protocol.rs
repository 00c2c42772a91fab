//! The agent ⇄ executor-process protocol (ADR 0016), on the child's stdin and stdout: frames of
//! a little-endian `u32` length and that many bytes of postcard. The child says [`Reply::Ready`]
//! (or [`Reply::Refused`]) once it has connected to libvirt, then answers each [`Request`] with
//! one [`Reply::Events`], in order. The agent sends one request at a time. The work and its
//! outcome are the types the agent and the executor already share (the control plane's
//! [`Envelope`], the agent's [`DeviceInfo`], usbpt [`Event`]s).

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use usbpt_schemas::{codec, DeviceId, Envelope, Event, LineageId};

use super::hands::DeviceMap;
use super::work::DeviceInfo;

/// A frame larger than this is refused (a request carries one envelope and the host's devices).
pub const MAX_FRAME: usize = 16 << 20;

/// Work for the executor process.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Request {
    /// [`super::Hands::handle`]: the envelope in the stream's own encoding
    /// ([`usbpt_schemas::codec`], which writes the optional origin as its version says).
    Handle {
        envelope: Vec<u8>,
        devices: Vec<(DeviceId, DeviceInfo)>,
    },
    /// [`super::Hands::reattach_lineage`].
    ReattachLineage {
        lineage: LineageId,
        device: DeviceId,
        info: DeviceInfo,
    },
    /// [`super::Hands::resume_after_host_boot`].
    ResumeAfterHostBoot {
        devices: Vec<(DeviceId, DeviceInfo)>,
    },
}

/// What the executor process says.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Reply {
    /// Connected to libvirt; the `<domain type>` it defines.
    Ready { domain_type: String },
    /// Could not connect to libvirt (the error's text); the process exits.
    Refused { error: String },
    /// The outcome of one request.
    Events(Vec<Event>),
}

impl Request {
    /// The request for [`super::Hands::handle`].
    pub fn handle(envelope: &Envelope, devices: &DeviceMap) -> Result<Self, codec::EncodeError> {
        Ok(Self::Handle {
            envelope: codec::encode(envelope)?,
            devices: device_list(devices),
        })
    }
}

/// The device map as a request carries it.
pub fn device_list(devices: &DeviceMap) -> Vec<(DeviceId, DeviceInfo)> {
    devices.iter().map(|(id, info)| (*id, *info)).collect()
}

/// Writes one frame and flushes it.
pub async fn write_frame<W: AsyncWrite + Unpin, T: Serialize>(
    w: &mut W,
    msg: &T,
) -> std::io::Result<()> {
    let bytes = postcard::to_stdvec(msg).map_err(std::io::Error::other)?;
    let len = u32::try_from(bytes.len()).map_err(std::io::Error::other)?;
    w.write_all(&len.to_le_bytes()).await?;
    w.write_all(&bytes).await?;
    w.flush().await
}

/// Reads one frame; `Ok(None)` at a clean end of the stream (before a frame's first byte).
pub async fn read_frame<R: AsyncRead + Unpin, T: for<'de> Deserialize<'de>>(
    r: &mut R,
) -> std::io::Result<Option<T>> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = u32::from_le_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("frame of {len} bytes is over the {MAX_FRAME}-byte limit"),
        ));
    }
    let mut buf = vec![0u8; len];
    r.read_exact(&mut buf).await?;
    postcard::from_bytes(&buf)
        .map(Some)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}

/// One frame as bytes (tests write a child's replies with it).
pub fn frame<T: Serialize>(msg: &T) -> Result<Vec<u8>, postcard::Error> {
    let bytes = postcard::to_stdvec(msg)?;
    let mut out = Vec::with_capacity(bytes.len() + 4);
    out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
    out.extend_from_slice(&bytes);
    Ok(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use usbpt_schemas::{HostName, ServerAction, ServerActionRequested, ServerId};

    #[tokio::test]
    async fn a_request_and_a_reply_go_through_a_pipe_as_sent() {
        let env = Envelope::new(Event::ServerActionRequested(ServerActionRequested {
            server_id: ServerId::new_v7(),
            host: HostName::new("h1").unwrap(),
            action: ServerAction::Stop,
        }));
        let request = Request::handle(&env, &DeviceMap::new()).unwrap();
        let reply = Reply::Events(vec![env.body.clone()]);
        let (mut a, mut b) = tokio::io::duplex(64);
        let (sent, got) = tokio::join!(
            async {
                write_frame(&mut a, &request).await.unwrap();
                write_frame(&mut a, &reply).await.unwrap();
                drop(a);
            },
            async {
                let r: Request = read_frame(&mut b).await.unwrap().unwrap();
                let e: Reply = read_frame(&mut b).await.unwrap().unwrap();
                let end: Option<Reply> = read_frame(&mut b).await.unwrap();
                (r, e, end)
            }
        );
        let () = sent;
        let (r, e, end) = got;
        let Request::Handle { envelope, .. } = &r else {
            panic!("not a Handle: {r:?}")
        };
        assert_eq!(codec::decode(envelope).unwrap(), env);
        assert_eq!(e, reply);
        assert_eq!(end, None, "a clean end of the stream");
        assert_eq!(
            frame(&reply).unwrap()[4..],
            postcard::to_stdvec(&reply).unwrap()[..]
        );
    }

    #[tokio::test]
    async fn an_oversized_frame_is_refused() {
        let mut bytes: &[u8] = &u32::MAX.to_le_bytes();
        let err = read_frame::<_, Reply>(&mut bytes).await.unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::InvalidData);
    }
}
