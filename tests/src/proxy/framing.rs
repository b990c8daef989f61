//! Kafka wire framing: every request and response is a 4-byte big-endian length followed by
//! that many bytes.

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Frames above this size are refused rather than allocated (a corrupt length prefix).
pub const MAX_FRAME_BYTES: usize = 256 * 1024 * 1024;

/// Reads one frame body (without its length prefix). `Ok(None)` on a clean end of stream.
pub async fn read_frame<R: AsyncRead + Unpin>(reader: &mut R) -> std::io::Result<Option<BytesMut>> {
    let mut len = [0u8; 4];
    match reader.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = i32::from_be_bytes(len);
    let len = usize::try_from(len)
        .ok()
        .filter(|l| *l <= MAX_FRAME_BYTES)
        .ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("invalid Kafka frame length {len}"),
            )
        })?;
    let mut body = BytesMut::zeroed(len);
    reader.read_exact(&mut body).await?;
    Ok(Some(body))
}

/// Writes one frame (length prefix + body) and flushes.
pub async fn write_frame<W: AsyncWrite + Unpin>(
    writer: &mut W,
    body: &[u8],
) -> std::io::Result<()> {
    let len = i32::try_from(body.len()).map_err(|_| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("frame of {} bytes is too large", body.len()),
        )
    })?;
    writer.write_all(&len.to_be_bytes()).await?;
    writer.write_all(body).await?;
    writer.flush().await
}

/// The correlation id of a response frame (its first 4 bytes), if the frame is long enough.
pub fn response_correlation_id(frame: &[u8]) -> Option<i32> {
    frame
        .get(0..4)
        .map(|b| i32::from_be_bytes([b[0], b[1], b[2], b[3]]))
}

/// (api key, api version, correlation id) of a request frame, read without a full decode.
pub fn request_key_version_correlation(frame: &[u8]) -> Option<(i16, i16, i32)> {
    let b = frame.get(0..8)?;
    Some((
        i16::from_be_bytes([b[0], b[1]]),
        i16::from_be_bytes([b[2], b[3]]),
        i32::from_be_bytes([b[4], b[5], b[6], b[7]]),
    ))
}

/// The `client.id` in a request header (v1 and later: after the correlation id, a nullable
/// int16-length string). None when absent, null or not UTF-8.
pub fn request_client_id(frame: &[u8]) -> Option<&str> {
    let len = i16::from_be_bytes([*frame.get(8)?, *frame.get(9)?]);
    let len = usize::try_from(len).ok()?;
    std::str::from_utf8(frame.get(10..10 + len)?).ok()
}

/// Converts a frame into immutable bytes for decoding.
pub fn freeze(frame: BytesMut) -> Bytes {
    frame.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn frames_round_trip_and_eof_is_none() {
        let mut buf = Vec::new();
        write_frame(&mut buf, b"hello").await.unwrap();
        write_frame(&mut buf, b"").await.unwrap();
        let mut reader = &buf[..];
        assert_eq!(
            &read_frame(&mut reader).await.unwrap().unwrap()[..],
            b"hello"
        );
        assert_eq!(&read_frame(&mut reader).await.unwrap().unwrap()[..], b"");
        assert!(read_frame(&mut reader).await.unwrap().is_none());
    }

    #[tokio::test]
    async fn negative_length_is_an_error() {
        let buf = (-1i32).to_be_bytes();
        let mut reader = &buf[..];
        assert!(read_frame(&mut reader).await.is_err());
    }

    #[test]
    fn request_prefix_is_parsed() {
        let frame = [0, 1, 0, 12, 0, 0, 0, 7, 0xff];
        assert_eq!(request_key_version_correlation(&frame), Some((1, 12, 7)));
        assert_eq!(response_correlation_id(&frame[4..]), Some(7));
    }

    #[test]
    fn request_client_id_is_parsed() {
        let mut frame = vec![0, 2, 0, 7, 0, 0, 0, 9, 0, 5];
        frame.extend_from_slice(b"group tagged-fields");
        assert_eq!(request_client_id(&frame), Some("group"));
        let null = [0, 2, 0, 7, 0, 0, 0, 9, 0xff, 0xff];
        assert_eq!(request_client_id(&null), None);
        assert_eq!(request_client_id(&frame[..12]), None);
    }
}
