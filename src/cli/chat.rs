//! `streamhub chat`: a terminal chat client that survives server restarts.
//!
//! Lines read from standard input are sent, each with an idempotency key;
//! a line counts as delivered once the server's copy of it (its
//! acknowledgment) comes back. When the call fails for a reason worth
//! retrying, the client reconnects with `chat-after-seq` and the room's
//! epoch, so it gets exactly what it missed, and resends every line not yet
//! acknowledged under the same key, so nothing appears twice.
//!
//! With piped input the client exits once standard input has ended, every
//! line is acknowledged and the history asked for has been shown. Input
//! that has ended before the client joins (`</dev/null`) only reads the
//! history, as `--quiet` does, so no join or leave is announced for it. End of
//! input with nothing left to deliver ends it at once, even while the
//! server is unreachable; Ctrl-C ends it at any moment (see `main.rs`).

use std::{collections::VecDeque, time::Duration};

use anyhow::Context as _;
use serde::Serialize;
use tokio::{
    io::{AsyncBufReadExt, BufReader},
    sync::mpsc,
};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, metadata::MetadataValue};

use super::{Backoff, Context, format_ms, is_transient, terminal_safe};
use crate::{
    chat::service::{AFTER_SEQ_KEY, EPOCH_KEY, HISTORY_KEY, LAST_SEQ_KEY, MEMBER_KEY, ROOM_KEY},
    proto::chat::{ChatMessage, MessageKind, chat_service_client::ChatServiceClient},
};

/// Arguments of `streamhub chat`.
#[derive(Debug, clap::Args)]
pub struct ChatArgs {
    /// Your name in the room; with credentials, your identity (the
    /// default then; another name is refused by the server).
    #[arg(long, env = "STREAMHUB_CHAT_NAME", default_value = "")]
    pub name: String,
    /// The room to join.
    #[arg(long, env = "STREAMHUB_CHAT_ROOM", default_value = "lobby")]
    pub room: String,
    /// How many recent messages of the room to show on joining (joins
    /// and leaves count as messages); 0 shows none.
    #[arg(long, default_value_t = 20)]
    pub history: u64,
    /// Do not announce your join and leave to the room.
    #[arg(long)]
    pub quiet: bool,
}

/// A received message as printed.
#[derive(Debug, Serialize)]
struct MessageView<'a> {
    room: &'a str,
    seq: u64,
    epoch: u64,
    kind: &'static str,
    sender: &'a str,
    message: &'a str,
    timestamp: i64,
    timestamp_ms: i64,
}

fn kind_name(kind: i32) -> &'static str {
    match MessageKind::try_from(kind) {
        Ok(MessageKind::KindMember) => "member",
        Ok(MessageKind::KindJoined) => "joined",
        Ok(MessageKind::KindLeft) => "left",
        Ok(MessageKind::KindShutdown) => "shutdown",
        Err(_) => "unknown",
    }
}

/// Prints one message: `[HH:MM:SS] sender: text`, or one JSON object.
pub fn print_message(ctx: &Context, room: &str, m: &ChatMessage) {
    let view = MessageView {
        room,
        seq: m.seq,
        epoch: m.epoch,
        kind: kind_name(m.kind),
        sender: &m.sender,
        message: &m.message,
        timestamp: m.timestamp,
        timestamp_ms: m.timestamp_ms,
    };
    ctx.emit(&view, || {
        let ms = u64::try_from(m.timestamp_ms)
            .ok()
            .filter(|ms| *ms > 0)
            .unwrap_or_else(|| u64::try_from(m.timestamp).unwrap_or(0) * 1000);
        let stamp = format_ms(ms);
        // RFC 3339 "YYYY-MM-DDTHH:MM:SS.mmmZ": keep the time of day.
        let time = stamp.get(11..19).unwrap_or(&stamp);
        // Another member's text reaches this terminal: escape sequences
        // and control characters are shown, not obeyed.
        match view.kind {
            "member" => format!(
                "[{time}] {}: {}",
                terminal_safe(&m.sender),
                terminal_safe(&m.message)
            ),
            _ => format!("[{time}] * {}", terminal_safe(&m.message)),
        }
    });
}

/// A line waiting for its acknowledgment.
#[derive(Debug, Clone)]
struct Pending {
    key: String,
    text: String,
}

/// What the client keeps across reconnects.
#[derive(Debug, Default)]
struct Session {
    /// Last seq shown (0: none yet).
    last_seq: u64,
    /// The room's epoch, once known.
    epoch: Option<u64>,
    /// Sent lines not acknowledged yet, oldest first.
    pending: VecDeque<Pending>,
    /// Lines taken from standard input so far (for keys).
    lines: u64,
    /// Standard input has ended.
    input_done: bool,
    /// The last seq the room had when this call joined: what it replays
    /// (history, or what was missed) goes up to here, and piped input
    /// waits for it before exiting.
    replay_until: u64,
}

impl Session {
    /// Takes a line from standard input (`None`: input has ended).
    fn take_line(&mut self, run_id: &str, line: Option<String>) -> Option<Pending> {
        let Some(text) = line else {
            self.input_done = true;
            return None;
        };
        self.lines += 1;
        let pending = Pending {
            key: format!("{run_id}-{}", self.lines),
            text,
        };
        self.pending.push_back(pending.clone());
        Some(pending)
    }

    /// Input has ended and nothing is left to deliver or show.
    fn finished(&self) -> bool {
        self.input_done && self.pending.is_empty() && self.last_seq >= self.replay_until
    }

    /// Input has ended with nothing typed left to deliver: no reason to
    /// wait for a server that cannot be reached.
    fn nothing_to_deliver(&self) -> bool {
        self.input_done && self.pending.is_empty()
    }
}

enum Outcome {
    Finished,
    Retry(String),
    Restart(String),
}

/// `streamhub chat`.
pub async fn run(ctx: &Context, mut args: ChatArgs) -> anyhow::Result<()> {
    if args.name.is_empty() {
        if ctx.security.token.is_none()
            && ctx.security.token_file.is_none()
            && ctx.security.cert.is_none()
        {
            anyhow::bail!("give --name (or credentials, whose identity is then your name)");
        }
        args.name = super::token::identity(ctx).await?.identity;
    }
    crate::chat::RoomName::parse(&args.room).map_err(|e| anyhow::anyhow!("--room: {e}"))?;
    crate::chat::validate_name("--name", &args.name).map_err(|e| anyhow::anyhow!("{e}"))?;
    let (lines_tx, mut lines) = mpsc::channel::<String>(64);
    tokio::spawn(read_stdin(lines_tx));
    // Keys unique to this run of the client.
    let run_id = format!(
        "{}-{}",
        std::process::id(),
        crate::chat::now_ms().rem_euclid(1_000_000_000)
    );
    let mut session = Session::default();
    // Input that has already ended or has a line ready (`</dev/null`, a
    // file, a pipe that was written to) is read before joining, so that
    // empty input reads the history without joining as a member: nobody
    // sees a join and a leave from a client that had nothing to say. Input
    // with nothing ready yet (a terminal, an open pipe) is not waited for.
    if input_ready() {
        let first = lines.recv().await;
        session.take_line(&run_id, first);
    }
    let mut backoff = Backoff::new(Duration::from_secs(10));
    loop {
        let outcome = talk(ctx, &args, &run_id, &mut session, &mut lines, &mut backoff).await?;
        match outcome {
            Outcome::Finished => return Ok(()),
            Outcome::Retry(why) => {
                // The server cannot be reached, and input has ended with
                // nothing left to deliver: nothing to wait for.
                // A URL whose scheme the port does not speak never gets
                // better.
                ctx.check_scheme().await?;
                if session.nothing_to_deliver() {
                    return Err(gave_up(&args, &why));
                }
                ctx.note(
                    "reconnecting",
                    &format!(
                        "connection lost ({why}); reconnecting in {:.1}s",
                        backoff.delay().as_secs_f64()
                    ),
                );
                // Keep reading input while waiting: its end, with nothing
                // to deliver, ends the client.
                let wait = backoff.wait();
                tokio::pin!(wait);
                loop {
                    tokio::select! {
                        () = &mut wait => break,
                        line = lines.recv(), if !session.input_done => {
                            session.take_line(&run_id, line);
                            // Ctrl-D while waiting: the user quits.
                            if session.nothing_to_deliver() {
                                return Ok(());
                            }
                        }
                    }
                }
            }
            Outcome::Restart(why) => {
                ctx.note(
                    "history-reset",
                    &format!("cannot resume ({why}); rejoining with recent history"),
                );
                session.last_seq = 0;
                session.epoch = None;
            }
        }
    }
}

/// The error of a chat whose input has ended while the server could not
/// be reached or refused the call: whatever was asked (the history, or
/// joining) was not done, so the command fails instead of ending quietly
/// as if the room were empty.
fn gave_up(args: &ChatArgs, why: &str) -> anyhow::Error {
    anyhow::anyhow!(
        "room {:?}: the call failed and input has ended, so there is nothing to retry for: {why}",
        args.room
    )
}

/// Whether standard input has a line or its end ready to read now: a
/// non-blocking `poll` (readable or hung up). Not for a terminal, where a
/// user types in their own time.
fn input_ready() -> bool {
    use rustix::event::{PollFd, PollFlags, Timespec, poll};
    let stdin = std::io::stdin();
    if std::io::IsTerminal::is_terminal(&stdin) {
        return false;
    }
    let mut fds = [PollFd::new(&stdin, PollFlags::IN)];
    let now = Timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    poll(&mut fds, Some(&now)).is_ok_and(|ready| ready > 0)
        && fds[0]
            .revents()
            .intersects(PollFlags::IN | PollFlags::HUP | PollFlags::ERR)
}

async fn read_stdin(tx: mpsc::Sender<String>) {
    let mut input = BufReader::new(tokio::io::stdin()).lines();
    while let Ok(Some(line)) = input.next_line().await {
        if line.trim().is_empty() {
            continue;
        }
        if tx.send(line).await.is_err() {
            return;
        }
    }
}

fn metadata(
    request: &mut tonic::Request<ReceiverStream<ChatMessage>>,
    key: &'static str,
    value: &str,
) -> anyhow::Result<()> {
    let value = MetadataValue::try_from(value)
        .with_context(|| format!("{value:?} cannot be sent as {key} metadata"))?;
    request.metadata_mut().insert(key, value);
    Ok(())
}

/// One call: from connecting to the call's end.
async fn talk(
    ctx: &Context,
    args: &ChatArgs,
    run_id: &str,
    session: &mut Session,
    lines: &mut mpsc::Receiver<String>,
    backoff: &mut Backoff,
) -> anyhow::Result<Outcome> {
    let connect = ctx.connect();
    tokio::pin!(connect);
    let channel = loop {
        tokio::select! {
            connected = &mut connect => match connected {
                Ok(channel) => break channel,
                Err(err) if super::is_permanent(&err) => return Err(err),
                Err(err) => return Ok(Outcome::Retry(format!("{err:#}"))),
            },
            // Input that ends meanwhile is no reason to give up this
            // attempt: the history asked for is still to be shown.
            line = lines.recv(), if !session.input_done => {
                session.take_line(run_id, line);
            }
        }
    };
    let (tx, rx) = mpsc::channel::<ChatMessage>(64);
    let mut request = tonic::Request::new(ReceiverStream::new(rx));
    metadata(&mut request, ROOM_KEY, &args.room)?;
    // A client with nothing to say (input ended, nothing pending) only
    // reads: it does not join as a member.
    if !args.quiet && !session.nothing_to_deliver() {
        metadata(&mut request, MEMBER_KEY, &args.name)?;
    }
    match session.epoch {
        Some(epoch) => {
            metadata(&mut request, AFTER_SEQ_KEY, &session.last_seq.to_string())?;
            metadata(&mut request, EPOCH_KEY, &epoch.to_string())?;
        }
        None => metadata(&mut request, HISTORY_KEY, &args.history.to_string())?,
    }
    let response = match ChatServiceClient::new(channel).chat(request).await {
        Ok(response) => response,
        Err(status) if is_transient(&status) => {
            ctx.note_failure(&status);
            return Ok(Outcome::Retry(status_text(&status)));
        }
        Err(status)
            if matches!(status.code(), Code::OutOfRange | Code::FailedPrecondition)
                && session.epoch.is_some() =>
        {
            return Ok(Outcome::Restart(status.message().to_owned()));
        }
        Err(status) => return Err(status_error(status)),
    };
    let number = |key: &str| -> Option<u64> {
        response
            .metadata()
            .get(key)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
    };
    let resuming = session.epoch.is_some();
    if let Some(epoch) = number(EPOCH_KEY) {
        session.epoch = Some(epoch);
    }
    // With history asked for (or on a resume) the call replays up to the
    // room's last seq at joining; without, nothing is replayed.
    session.replay_until = if resuming || args.history > 0 {
        number(LAST_SEQ_KEY).unwrap_or(0)
    } else {
        0
    };
    let mut inbound = response.into_inner();
    if session.last_seq > 0 {
        ctx.note(
            "resumed",
            &format!("reconnected; resuming after seq {}", session.last_seq),
        );
    }
    // Resend what was not acknowledged, under the same keys.
    for pending in &session.pending {
        let message = outgoing(&args.name, pending);
        if tx.send(message).await.is_err() {
            return Ok(Outcome::Retry("call closed while resending".into()));
        }
    }
    let mut outbound = Some(tx);
    loop {
        if session.finished() {
            return Ok(Outcome::Finished);
        }
        tokio::select! {
            line = lines.recv(), if !session.input_done => {
                if let Some(pending) = session.take_line(run_id, line) {
                    let message = outgoing(&args.name, &pending);
                    if let Some(tx) = &outbound
                        && tx.send(message).await.is_err()
                    {
                        outbound = None;
                    }
                }
            },
            message = inbound.message() => match message {
                Ok(Some(message)) => {
                    backoff.reset();
                    receive(ctx, args, session, &message);
                }
                Ok(None) => return Ok(Outcome::Retry("the server ended the call".into())),
                Err(status) if is_transient(&status)
                    || status.code() == Code::ResourceExhausted =>
                {
                    ctx.note_failure(&status);
                    return Ok(Outcome::Retry(status_text(&status)));
                }
                Err(status) => return Err(status_error(status)),
            },
        }
    }
}

fn outgoing(name: &str, pending: &Pending) -> ChatMessage {
    ChatMessage {
        sender: name.to_owned(),
        message: pending.text.clone(),
        idempotency_key: pending.key.clone(),
        ..ChatMessage::default()
    }
}

fn receive(ctx: &Context, args: &ChatArgs, session: &mut Session, message: &ChatMessage) {
    if message.kind == i32::from(MessageKind::KindShutdown) {
        ctx.note("server-shutdown", "* the server is shutting down");
        return;
    }
    if message.sender == args.name && !message.idempotency_key.is_empty() {
        session.pending.retain(|p| p.key != message.idempotency_key);
    }
    // Older seqs are acknowledgments of resent lines already shown.
    if message.seq > session.last_seq {
        session.last_seq = message.seq;
        print_message(ctx, &args.room, message);
    }
}

/// A failed chat call as text, in this command's words: the server's
/// advice to gRPC clients (reconnect with `chat-after-seq`, leave
/// `chat-member` empty) becomes what to do with the CLI, which resumes by
/// itself and sends the identity's name unless `--name` is given.
fn status_text(status: &tonic::Status) -> String {
    cli_words(&super::status_text(status))
}

/// [`status_text`] as an error.
fn status_error(status: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("server answered {}", status_text(&status))
}

fn cli_words(text: &str) -> String {
    let mut text = text.replace(
        "(leave chat-member empty to have it filled in)",
        "(drop --name and STREAMHUB_CHAT_NAME: with credentials you speak under your identity)",
    );
    // The client reconnects with chat-after-seq and resends what was not
    // acknowledged by itself: that advice is for other clients.
    for advice in [
        "; reconnect (to any node) with chat-after-seq and resend what was not acknowledged",
        "; reconnect with chat-after-seq",
    ] {
        if let Some(at) = text.find(advice) {
            let end = text[at + advice.len()..]
                .find([')', ';'])
                .map_or(text.len(), |i| at + advice.len() + i);
            text.replace_range(at..end, "");
        }
    }
    text
}

#[cfg(test)]
mod cli_words_tests {
    use super::cli_words;

    #[test]
    fn protocol_advice_becomes_cli_advice() {
        assert_eq!(
            cli_words(
                "PermissionDenied: chat-member \"bob\" is not the authenticated identity \
                 \"alice\": a member speaks only under its own name (leave chat-member empty \
                 to have it filled in)"
            ),
            "PermissionDenied: chat-member \"bob\" is not the authenticated identity \
             \"alice\": a member speaks only under its own name (drop --name and \
             STREAMHUB_CHAT_NAME: with credentials you speak under your identity)"
        );
        assert_eq!(
            cli_words(
                "Unavailable: NATS down; reconnect (to any node) with chat-after-seq and resend \
                 what was not acknowledged"
            ),
            "Unavailable: NATS down"
        );
        assert_eq!(
            cli_words(
                "Unavailable: storage failed (x); last seq sent 4; reconnect with \
                 chat-after-seq: 4 and resend what was not acknowledged"
            ),
            "Unavailable: storage failed (x); last seq sent 4"
        );
    }
}
