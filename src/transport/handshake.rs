//! Notices when an HTTP/2 client has finished its side of the handshake:
//! the connection preface and its first SETTINGS frame.
//!
//! hyper does not say when a connection's handshake is done, and a
//! connection that never finishes one is exactly what
//! `limits.handshake_timeout` must close: one that sends nothing, half the
//! preface, or a SETTINGS frame header and then stalls. [`Watched`] looks
//! at the first bytes read from the connection (after TLS, if any) and
//! calls back once the preface and a whole SETTINGS frame have arrived.
//! An HTTP/1.1 connection's handshake is its first request head, which the
//! per-connection service sees; here it only stops looking. After that,
//! reads and writes pass straight through.

use std::{
    io,
    pin::Pin,
    task::{Context, Poll},
};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The HTTP/2 client connection preface (RFC 9113, section 3.4).
pub const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Bytes of an HTTP/2 frame header.
const FRAME_HEADER: usize = 9;

/// Frame type of SETTINGS.
const SETTINGS: u8 = 0x4;

/// What the first bytes of a connection have shown so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    /// More bytes are needed to tell.
    Pending,
    /// The HTTP/2 preface and the first SETTINGS frame have arrived.
    Http2Ready,
    /// Not (or not a well-formed) HTTP/2 preface: someone else decides.
    NotHttp2,
}

/// Follows the first bytes of a connection until the HTTP/2 handshake is
/// complete or the bytes are something else.
#[derive(Debug)]
pub struct PrefaceSniffer {
    /// The preface and the first frame header, as far as received.
    head: [u8; PREFACE.len() + FRAME_HEADER],
    /// Bytes of `head` filled.
    filled: usize,
    /// Bytes of the SETTINGS payload still to come, once its header is in.
    payload_left: Option<usize>,
    done: bool,
}

impl Default for PrefaceSniffer {
    fn default() -> Self {
        Self {
            head: [0; PREFACE.len() + FRAME_HEADER],
            filled: 0,
            payload_left: None,
            done: false,
        }
    }
}

impl PrefaceSniffer {
    /// Feeds the next bytes read; returns what they show. Once it has
    /// returned something other than [`Progress::Pending`] it is done and
    /// further input is ignored.
    pub fn feed(&mut self, mut bytes: &[u8]) -> Progress {
        if self.done {
            return Progress::Pending;
        }
        if self.filled < self.head.len() {
            let take = bytes.len().min(self.head.len() - self.filled);
            let start = self.filled;
            self.head[start..start + take].copy_from_slice(&bytes[..take]);
            self.filled += take;
            bytes = &bytes[take..];
            let preface_seen = self.filled.min(PREFACE.len());
            if self.head[..preface_seen] != PREFACE[..preface_seen] {
                return self.finish(Progress::NotHttp2);
            }
            if self.filled < self.head.len() {
                return Progress::Pending;
            }
            let frame = &self.head[PREFACE.len()..];
            if frame[3] != SETTINGS {
                return self.finish(Progress::NotHttp2);
            }
            let len =
                usize::from(frame[0]) << 16 | usize::from(frame[1]) << 8 | usize::from(frame[2]);
            self.payload_left = Some(len);
        }
        let Some(left) = self.payload_left.as_mut() else {
            return Progress::Pending;
        };
        *left = left.saturating_sub(bytes.len());
        if *left == 0 {
            self.finish(Progress::Http2Ready)
        } else {
            Progress::Pending
        }
    }

    fn finish(&mut self, progress: Progress) -> Progress {
        self.done = true;
        progress
    }
}

/// An IO object whose first bytes read go through a [`PrefaceSniffer`];
/// `on_ready` is called once, when the HTTP/2 handshake is complete.
#[derive(Debug)]
pub struct Watched<IO, F> {
    io: IO,
    sniffer: Option<(PrefaceSniffer, F)>,
}

impl<IO, F: FnOnce()> Watched<IO, F> {
    /// Wraps `io`.
    pub fn new(io: IO, on_ready: F) -> Self {
        Self {
            io,
            sniffer: Some((PrefaceSniffer::default(), on_ready)),
        }
    }

    fn observe(&mut self, bytes: &[u8]) {
        let Some((sniffer, _)) = self.sniffer.as_mut() else {
            return;
        };
        match sniffer.feed(bytes) {
            Progress::Pending => {}
            Progress::NotHttp2 => self.sniffer = None,
            Progress::Http2Ready => {
                if let Some((_, on_ready)) = self.sniffer.take() {
                    on_ready();
                }
            }
        }
    }
}

impl<IO: AsyncRead + Unpin, F: FnOnce() + Unpin> AsyncRead for Watched<IO, F> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.sniffer.is_none() {
            return Pin::new(&mut this.io).poll_read(cx, buf);
        }
        let before = buf.filled().len();
        let result = Pin::new(&mut this.io).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = result {
            let new = &buf.filled()[before..];
            if !new.is_empty() {
                this.observe(new);
            }
        }
        result
    }
}

impl<IO: AsyncWrite + Unpin, F: Unpin> AsyncWrite for Watched<IO, F> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings_frame(payload: usize) -> Vec<u8> {
        let mut frame = vec![
            (payload >> 16) as u8,
            (payload >> 8) as u8,
            payload as u8,
            SETTINGS,
            0,
            0,
            0,
            0,
            0,
        ];
        frame.resize(FRAME_HEADER + payload, 0);
        frame
    }

    #[test]
    fn preface_and_settings_complete_the_handshake_in_any_split() {
        let mut bytes = PREFACE.to_vec();
        bytes.extend(settings_frame(12));
        for split in 0..bytes.len() {
            let mut sniffer = PrefaceSniffer::default();
            assert_eq!(sniffer.feed(&bytes[..split]), Progress::Pending, "{split}");
            assert_eq!(
                sniffer.feed(&bytes[split..]),
                Progress::Http2Ready,
                "{split}"
            );
        }
        let mut sniffer = PrefaceSniffer::default();
        for (i, byte) in bytes.iter().enumerate() {
            let expected = if i + 1 == bytes.len() {
                Progress::Http2Ready
            } else {
                Progress::Pending
            };
            assert_eq!(sniffer.feed(&[*byte]), expected, "byte {i}");
        }
    }

    #[test]
    fn an_empty_settings_frame_completes_it_and_a_partial_payload_does_not() {
        let mut bytes = PREFACE.to_vec();
        bytes.extend(settings_frame(0));
        assert_eq!(PrefaceSniffer::default().feed(&bytes), Progress::Http2Ready);

        let mut bytes = PREFACE.to_vec();
        bytes.extend(settings_frame(6000));
        bytes.truncate(bytes.len() - 1);
        assert_eq!(PrefaceSniffer::default().feed(&bytes), Progress::Pending);
    }

    #[test]
    fn http1_and_garbage_are_told_apart_early() {
        let mut sniffer = PrefaceSniffer::default();
        assert_eq!(sniffer.feed(b"GET / HTTP/1.1\r\n"), Progress::NotHttp2);
        assert_eq!(PrefaceSniffer::default().feed(b"PRX"), Progress::NotHttp2);
        assert_eq!(
            PrefaceSniffer::default().feed(b"PRI * HT"),
            Progress::Pending
        );
        // The preface followed by something other than SETTINGS.
        let mut bytes = PREFACE.to_vec();
        bytes.extend([0, 0, 0, 0x6, 0, 0, 0, 0, 0]);
        assert_eq!(PrefaceSniffer::default().feed(&bytes), Progress::NotHttp2);
    }
}
