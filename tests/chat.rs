//! Chat rooms over loopback: order, isolation, replay and resume, dedupe,
//! half-close, slow members, validation, announcements, and the server
//! killed or stopped during traffic.

#![allow(clippy::unwrap_used)] // tests

mod common;

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    sync::{Arc, Mutex},
    time::Duration,
};

use common::{ServerProcess, TestServer, test_config, within};
use streamhub::proto::chat::{ChatMessage, MessageKind, chat_service_client::ChatServiceClient};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{
    Code, Status, Streaming,
    metadata::MetadataMap,
    transport::{Channel, Endpoint},
};

/// The unchanged seed contract, compiled as a client only.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
mod contract {
    pub mod chat {
        include!(concat!(env!("OUT_DIR"), "/contract/chat.rs"));
    }
}

/// One open Chat call.
struct Member {
    tx: Option<mpsc::Sender<ChatMessage>>,
    rx: Streaming<ChatMessage>,
    headers: MetadataMap,
}

fn msg(sender: &str, text: &str, key: &str) -> ChatMessage {
    ChatMessage {
        sender: sender.into(),
        message: text.into(),
        idempotency_key: key.into(),
        ..ChatMessage::default()
    }
}

async fn open(channel: Channel, meta: &[(&'static str, String)]) -> Result<Member, Status> {
    let (tx, rx) = mpsc::channel(64);
    let mut request = tonic::Request::new(ReceiverStream::new(rx));
    for (key, value) in meta {
        request.metadata_mut().insert(*key, value.parse().unwrap());
    }
    let response = ChatServiceClient::new(channel).chat(request).await?;
    let headers = response.metadata().clone();
    Ok(Member {
        tx: Some(tx),
        rx: response.into_inner(),
        headers,
    })
}

async fn join(server: &TestServer, room: &str) -> Member {
    open(server.channel().await, &[("chat-room", room.to_owned())])
        .await
        .unwrap()
}

impl Member {
    async fn send(&self, message: ChatMessage) {
        self.tx.as_ref().unwrap().send(message).await.unwrap();
    }

    async fn next(&mut self) -> ChatMessage {
        within("a chat message", self.rx.message())
            .await
            .unwrap()
            .expect("stream still open")
    }

    /// The next member message (skipping announcements).
    async fn next_member(&mut self) -> ChatMessage {
        loop {
            let m = self.next().await;
            if m.kind == MessageKind::KindMember as i32 {
                return m;
            }
        }
    }

    async fn error(&mut self) -> Status {
        loop {
            match within("the end of the call", self.rx.message()).await {
                Ok(Some(_)) => {}
                Ok(None) => panic!("call ended without a status"),
                Err(status) => return status,
            }
        }
    }

    fn header(&self, key: &str) -> u64 {
        self.headers
            .get(key)
            .unwrap_or_else(|| panic!("no {key} header"))
            .to_str()
            .unwrap()
            .parse()
            .unwrap()
    }
}

fn meta_u64(status: &Status, key: &str) -> u64 {
    status
        .metadata()
        .get(key)
        .unwrap_or_else(|| panic!("no {key} in {status:?}"))
        .to_str()
        .unwrap()
        .parse()
        .unwrap()
}

#[tokio::test]
async fn two_members_send_and_receive_at_once_in_one_order() {
    let server = TestServer::start().await;
    let mut a = join(&server, "lobby").await;
    let mut b = join(&server, "lobby").await;
    const N: usize = 50;
    let send_all = |m: &Member, who: &'static str| {
        let tx = m.tx.clone().unwrap();
        tokio::spawn(async move {
            for i in 0..N {
                tx.send(msg(who, &format!("{who} {i}"), &format!("{who}-{i}")))
                    .await
                    .unwrap();
            }
        })
    };
    let sa = send_all(&a, "ann");
    let sb = send_all(&b, "bob");
    let mut seen_a = Vec::new();
    let mut seen_b = Vec::new();
    // Both read while both send.
    for _ in 0..2 * N {
        seen_a.push(a.next_member().await);
        seen_b.push(b.next_member().await);
    }
    sa.await.unwrap();
    sb.await.unwrap();
    assert_eq!(seen_a, seen_b, "every member sees one order");
    let seqs: Vec<u64> = seen_a.iter().map(|m| m.seq).collect();
    assert_eq!(seqs, (1..=2 * N as u64).collect::<Vec<_>>());
    for who in ["ann", "bob"] {
        let own: Vec<&str> = seen_a
            .iter()
            .filter(|m| m.sender == who)
            .map(|m| m.message.as_str())
            .collect();
        let expected: Vec<String> = (0..N).map(|i| format!("{who} {i}")).collect();
        assert_eq!(own, expected, "{who}'s messages keep their order");
    }
    let first = &seen_a[0];
    assert!(first.timestamp > 1_600_000_000, "Unix seconds");
    assert_eq!(first.timestamp, first.timestamp_ms / 1000);
    assert_eq!(first.epoch, a.header("chat-epoch"));
    server.stop().await;
}

#[tokio::test]
async fn rooms_are_isolated() {
    let server = TestServer::start().await;
    let mut red = join(&server, "red").await;
    let mut blue = join(&server, "blue").await;
    red.send(msg("ann", "in red", "")).await;
    blue.send(msg("bob", "in blue", "")).await;
    let r = red.next_member().await;
    let b = blue.next_member().await;
    assert_eq!((r.message.as_str(), r.seq), ("in red", 1));
    assert_eq!((b.message.as_str(), b.seq), ("in blue", 1));
    red.send(msg("ann", "red again", "")).await;
    blue.send(msg("bob", "blue again", "")).await;
    assert_eq!(red.next_member().await.message, "red again");
    assert_eq!(blue.next_member().await.message, "blue again");
    assert_ne!(red.header("chat-epoch"), blue.header("chat-epoch"));
    server.stop().await;
}

#[tokio::test]
async fn replay_after_seq_then_live_without_gap_or_duplicate() {
    let server = TestServer::start().await;
    let mut writer = join(&server, "r").await;
    for i in 1..=20 {
        writer.send(msg("ann", &format!("m{i}"), "")).await;
    }
    for _ in 0..20 {
        writer.next_member().await;
    }
    // Keep writing while the late member joins.
    let tx = writer.tx.clone().unwrap();
    let more = tokio::spawn(async move {
        for i in 21..=40 {
            tx.send(msg("ann", &format!("m{i}"), "")).await.unwrap();
        }
    });
    let mut late = open(
        server.channel().await,
        &[
            ("chat-room", "r".into()),
            ("chat-after-seq", "5".into()),
            ("chat-epoch", writer.header("chat-epoch").to_string()),
        ],
    )
    .await
    .unwrap();
    let mut seqs = Vec::new();
    for _ in 6..=40 {
        let m = late.next_member().await;
        assert_eq!(m.message, format!("m{}", m.seq));
        seqs.push(m.seq);
    }
    more.await.unwrap();
    assert_eq!(seqs, (6..=40).collect::<Vec<_>>());

    // Recent history without a seq: the last N.
    let mut recent = open(
        server.channel().await,
        &[("chat-room", "r".into()), ("chat-history", "3".into())],
    )
    .await
    .unwrap();
    for seq in 38..=40 {
        assert_eq!(recent.next_member().await.seq, seq);
    }
    server.stop().await;
}

#[tokio::test]
async fn resume_is_all_or_nothing() {
    let mut config = test_config();
    config.chat.history = 5;
    let server = TestServer::start_with(config).await;
    let mut m = join(&server, "r").await;
    for i in 1..=10 {
        m.send(msg("ann", &format!("m{i}"), "")).await;
    }
    for _ in 0..10 {
        m.next_member().await;
    }
    let epoch = m.header("chat-epoch");
    let resume = |after: u64, epoch: u64| {
        let server = &server;
        async move {
            open(
                server.channel().await,
                &[
                    ("chat-room", "r".into()),
                    ("chat-after-seq", after.to_string()),
                    ("chat-epoch", epoch.to_string()),
                ],
            )
            .await
        }
    };
    // History holds 6..=10: after 2 would leave a gap.
    let gap = resume(2, epoch).await.err().expect("refused");
    assert_eq!(gap.code(), Code::OutOfRange, "{gap:?}");
    assert_eq!(meta_u64(&gap, "chat-oldest-seq"), 6);
    assert!(
        gap.message().contains("oldest seq available is 6"),
        "{gap:?}"
    );
    // Beyond the last seq.
    let ahead = resume(11, epoch).await.err().expect("refused");
    assert_eq!(ahead.code(), Code::OutOfRange);
    // Another epoch: the history was reset.
    let reset = resume(7, epoch + 1).await.err().expect("refused");
    assert_eq!(reset.code(), Code::FailedPrecondition, "{reset:?}");
    assert_eq!(meta_u64(&reset, "chat-epoch"), epoch);
    assert_eq!(meta_u64(&reset, "chat-oldest-seq"), 6);
    // The edge: after 5 is exactly what history holds.
    let mut ok = resume(5, epoch).await.unwrap();
    for seq in 6..=10 {
        assert_eq!(ok.next_member().await.seq, seq);
    }
    server.stop().await;
}

#[tokio::test]
async fn duplicate_sends_are_suppressed() {
    let server = TestServer::start().await;
    let mut watcher = join(&server, "r").await;
    let mut first = join(&server, "r").await;
    first.send(msg("ann", "only once", "key-1")).await;
    let original = first.next_member().await;
    assert_eq!(
        (original.seq, original.idempotency_key.as_str()),
        (1, "key-1")
    );
    drop(first);

    // Reconnect and send the same message again, then a marker.
    let mut again = join(&server, "r").await;
    again.send(msg("ann", "only once", "key-1")).await;
    let ack = again.next_member().await;
    assert_eq!(
        ack.seq, 1,
        "the duplicate is acknowledged with the original's seq"
    );
    assert_eq!(ack.idempotency_key, "key-1");
    again.send(msg("ann", "marker", "key-2")).await;
    assert_eq!(again.next_member().await.seq, 2);

    let seen: Vec<(u64, String)> = vec![watcher.next_member().await, watcher.next_member().await]
        .into_iter()
        .map(|m| (m.seq, m.message))
        .collect();
    assert_eq!(
        seen,
        [(1, "only once".to_owned()), (2, "marker".to_owned())],
        "no second broadcast"
    );
    // The same key from another sender is another message.
    again.send(msg("bob", "mine", "key-1")).await;
    assert_eq!(watcher.next_member().await.seq, 3);
    server.stop().await;
}

#[tokio::test]
async fn half_closed_member_keeps_receiving() {
    let server = TestServer::start().await;
    let mut quiet = join(&server, "r").await;
    quiet.send(msg("ann", "last words", "")).await;
    // CloseSend.
    quiet.tx = None;
    assert_eq!(quiet.next_member().await.message, "last words");
    let talker = join(&server, "r").await;
    for i in 0..3 {
        talker.send(msg("bob", &format!("b{i}"), "")).await;
    }
    for i in 0..3 {
        assert_eq!(quiet.next_member().await.message, format!("b{i}"));
    }
    server.stop().await;
}

#[tokio::test]
async fn slow_member_is_cut_off_then_resumes_without_loss() {
    let mut config = test_config();
    config.chat.member_queue = 64;
    config.chat.max_batch = 16;
    let server = TestServer::start_with(config).await;
    // Small HTTP/2 windows so the transport buffers little before the
    // server's queue for the member fills.
    let slow_channel = Endpoint::from_shared(server.url())
        .unwrap()
        .initial_stream_window_size(Some(65_535))
        .initial_connection_window_size(Some(65_535))
        .connect()
        .await
        .unwrap();
    let mut slow = open(slow_channel, &[("chat-room", "r".into())])
        .await
        .unwrap();
    let mut fast = join(&server, "r").await;
    let mut sender = join(&server, "r").await;
    const N: u64 = 400;
    let text = "x".repeat(1024);
    let tx = sender.tx.clone().unwrap();
    let body = text.clone();
    let producer = tokio::spawn(async move {
        for _ in 0..N {
            tx.send(msg("bob", &body, "")).await.unwrap();
        }
    });
    // The others are unaffected: all N, in order.
    for seq in 1..=N {
        assert_eq!(fast.next_member().await.seq, seq);
        assert_eq!(sender.next_member().await.seq, seq);
    }
    producer.await.unwrap();

    // Now the slow member reads: a prefix, then the cut-off.
    let mut got = Vec::new();
    let status = loop {
        match within("slow member's stream", slow.rx.message()).await {
            Ok(Some(m)) => got.push(m.seq),
            Ok(None) => panic!("ended without a status"),
            Err(status) => break status,
        }
    };
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    let last = meta_u64(&status, "chat-last-seq");
    assert!(last < N, "cut off before the end (last {last})");
    assert!(status.message().contains(&format!("last seq sent {last}")));
    assert_eq!(got, (1..=last).collect::<Vec<_>>());

    let mut back = open(
        server.channel().await,
        &[
            ("chat-room", "r".into()),
            ("chat-after-seq", last.to_string()),
        ],
    )
    .await
    .unwrap();
    for seq in last + 1..=N {
        assert_eq!(back.next_member().await.seq, seq);
    }
    server.stop().await;
}

#[tokio::test]
async fn invalid_messages_and_metadata_are_refused() {
    let mut config = test_config();
    config.chat.max_text_bytes = 1024;
    let server = TestServer::start_with(config).await;
    let refused = |meta: Vec<(&'static str, String)>| {
        let server = &server;
        async move {
            open(server.channel().await, &meta)
                .await
                .err()
                .expect("refused")
        }
    };
    for (meta, field) in [
        (vec![("chat-room", "r".repeat(65))], "room"),
        (vec![("chat-room", "a\tb".to_owned())], "room"),
        (
            vec![("chat-after-seq", "soon".to_owned())],
            "chat-after-seq",
        ),
        (vec![("chat-member", String::new())], "chat-member"),
    ] {
        let status = refused(meta).await;
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert!(status.message().starts_with(field), "{status:?}");
    }

    let mut forged = msg("server", "everyone out", "");
    forged.kind = MessageKind::KindShutdown as i32;
    for (message, field) in [
        (msg("", "hi", ""), "sender"),
        (msg("ann", "", ""), "message"),
        (msg("ann", &"x".repeat(1025), ""), "message"),
        (msg("ann", "hi", &"k".repeat(129)), "idempotency_key"),
        (forged, "kind"),
    ] {
        let mut m = join(&server, "r").await;
        m.send(message).await;
        let status = m.error().await;
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert!(status.message().starts_with(field), "{status:?}");
    }
    server.stop().await;
}

#[tokio::test]
async fn joins_and_leaves_are_announced_as_server_messages() {
    let server = TestServer::start().await;
    let mut ann = open(
        server.channel().await,
        &[("chat-room", "r".into()), ("chat-member", "ann".into())],
    )
    .await
    .unwrap();
    let own = ann.next().await;
    assert_eq!(own.kind, MessageKind::KindJoined as i32);
    assert_eq!((own.sender.as_str(), own.seq), ("ann", 1));
    let bob = open(
        server.channel().await,
        &[("chat-room", "r".into()), ("chat-member", "bob".into())],
    )
    .await
    .unwrap();
    let joined = ann.next().await;
    assert_eq!(joined.kind, MessageKind::KindJoined as i32);
    assert_eq!((joined.sender.as_str(), joined.seq), ("bob", 2));
    bob.send(msg("bob", "hi", "")).await;
    let hi = ann.next().await;
    assert_eq!((hi.kind, hi.seq), (MessageKind::KindMember as i32, 3));
    drop(bob);
    let left = ann.next().await;
    assert_eq!(left.kind, MessageKind::KindLeft as i32);
    assert_eq!((left.sender.as_str(), left.seq), ("bob", 4));
    server.stop().await;
}

#[tokio::test]
async fn seed_client_from_the_unchanged_contract_works() {
    use contract::chat::{
        ChatMessage as SeedMessage, chat_service_client::ChatServiceClient as SeedClient,
    };
    let server = TestServer::start().await;
    let mut other = join(&server, "lobby").await;
    let (tx, rx) = mpsc::channel(4);
    let mut seed = SeedClient::new(server.channel().await)
        .chat(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    tx.send(SeedMessage {
        sender: "Client".into(),
        message: "Hi there! Message 0".into(),
        timestamp: 0,
    })
    .await
    .unwrap();
    let echo = within("seed echo", seed.message()).await.unwrap().unwrap();
    assert_eq!(echo.sender, "Client");
    assert_eq!(echo.message, "Hi there! Message 0");
    assert!(echo.timestamp > 1_600_000_000);
    other
        .send(msg("Server", "Hello from the server!", ""))
        .await;
    let hello = within("seed receive", seed.message())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(hello.message, "Hello from the server!");
    assert_eq!(other.next_member().await.sender, "Client");
    // CloseSend: still receiving.
    drop(tx);
    other.send(msg("Server", "after close", "")).await;
    let after = within("seed receive", seed.message())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(after.message, "after close");
    server.stop().await;
}

#[tokio::test]
async fn shutdown_delivers_accepted_messages_then_ends_with_unavailable() {
    let mut server = TestServer::start().await;
    let mut a = join(&server, "r").await;
    let mut b = join(&server, "r").await;
    for i in 0..20 {
        a.send(msg("ann", &format!("m{i}"), &format!("k{i}"))).await;
    }
    // Wait until the server has acknowledged the last one to its sender.
    let mut acked = Vec::new();
    while acked.len() < 20 {
        acked.push(a.next_member().await.seq);
    }
    server.begin_shutdown();
    // b has read nothing yet: it still gets all 20, the notice, then
    // UNAVAILABLE.
    let mut seen = Vec::new();
    let status = loop {
        match within("b's stream", b.rx.message()).await {
            Ok(Some(m)) if m.kind == MessageKind::KindShutdown as i32 => {
                assert_eq!(m.seq, 0);
            }
            Ok(Some(m)) => seen.push(m.seq),
            Ok(None) => panic!("no status"),
            Err(status) => break status,
        }
    };
    assert_eq!(status.code(), Code::Unavailable);
    assert_eq!(seen, acked);
    assert_eq!(meta_u64(&status, "chat-last-seq"), 20);
    // New chats are refused: the listener is closed or the call fails.
    if let Ok(channel) = Endpoint::from_shared(server.url()).unwrap().connect().await {
        let refused = open(channel, &[]).await.err().expect("refused");
        assert_eq!(refused.code(), Code::Unavailable);
    }
    let data_dir = server.stop().await;

    // Restart on the same data: resume gives exactly what was missed.
    let server = TestServer::start_in(test_config(), data_dir).await;
    let writer = join(&server, "r").await;
    writer.send(msg("ann", "after restart", "")).await;
    let mut back = open(
        server.channel().await,
        &[("chat-room", "r".into()), ("chat-after-seq", "18".into())],
    )
    .await
    .unwrap();
    for seq in 19..=21 {
        assert_eq!(back.next_member().await.seq, seq);
    }
    server.stop().await;
}

// ---- The server process killed or stopped while members talk ----

/// What one member of the crash tests has seen and sent, across
/// reconnects.
#[derive(Default)]
struct Ledger {
    /// Messages in delivery order (seq strictly increasing, no gap).
    seen: Vec<ChatMessage>,
    last_seq: u64,
    epoch: u64,
    /// Indexes of own messages that may have been sent.
    sent_upto: usize,
    /// Own messages acknowledged.
    acked: HashSet<usize>,
    /// How many times each own index was acknowledged (dup acks count).
    ack_count: BTreeMap<usize, u32>,
}

struct Peer {
    name: String,
    total: usize,
    ledger: Arc<Mutex<Ledger>>,
    acks: watch::Sender<usize>,
}

/// How one session with the server ended.
#[derive(Debug)]
enum Ended {
    Done,
    Status(Status),
}

impl Peer {
    fn new(name: &str, total: usize) -> Self {
        Self {
            name: name.into(),
            total,
            ledger: Arc::default(),
            acks: watch::channel(0).0,
        }
    }

    fn key(&self, i: usize) -> String {
        format!("{}-{i}", self.name)
    }

    /// Talks to `url` until it has seen `expected` member messages or the
    /// call ends.
    async fn session(&self, url: String, expected: usize) -> Ended {
        let channel = within("connect", async {
            loop {
                if let Ok(ep) = Endpoint::from_shared(url.clone()).unwrap().connect().await {
                    return ep;
                }
                tokio::task::yield_now().await;
            }
        })
        .await;
        let (resume, epoch, to_send, start_new) = {
            let l = self.ledger.lock().unwrap();
            let pending: Vec<usize> = (0..l.sent_upto).filter(|i| !l.acked.contains(i)).collect();
            (l.last_seq, l.epoch, pending, l.sent_upto)
        };
        // Always replay from what this member has seen (0 at first), so a
        // member that joins after the other started sending misses nothing.
        let mut meta = vec![
            ("chat-room", "crash".to_owned()),
            ("chat-after-seq", resume.to_string()),
        ];
        if epoch != 0 {
            meta.push(("chat-epoch", epoch.to_string()));
        }
        let mut member = match open(channel, &meta).await {
            Ok(m) => m,
            Err(status) => return Ended::Status(status),
        };
        let tx = member.tx.take().unwrap();
        let ledger = Arc::clone(&self.ledger);
        let (name, total) = (self.name.clone(), self.total);
        let sender = tokio::spawn(async move {
            let keys = to_send.into_iter().chain(start_new..total);
            for i in keys {
                {
                    let mut l = ledger.lock().unwrap();
                    l.sent_upto = l.sent_upto.max(i + 1);
                }
                let m = msg(&name, &format!("{name} {i}"), &format!("{name}-{i}"));
                if tx.send(m).await.is_err() {
                    return;
                }
            }
        });
        let ended = loop {
            // Buffered messages are ready at once: let the other futures of
            // the test (the other member, the killer) run in between.
            tokio::task::yield_now().await;
            let m = match member.rx.message().await {
                Ok(Some(m)) => m,
                Ok(None) => break Ended::Status(Status::unknown("ended without status")),
                Err(status) => break Ended::Status(status),
            };
            if m.kind == MessageKind::KindShutdown as i32 {
                continue;
            }
            let mut l = self.ledger.lock().unwrap();
            l.epoch = m.epoch;
            if m.sender == self.name
                && let Some(i) = m
                    .idempotency_key
                    .strip_prefix(&format!("{}-", self.name))
                    .and_then(|i| i.parse::<usize>().ok())
            {
                l.acked.insert(i);
                *l.ack_count.entry(i).or_default() += 1;
                self.acks.send_replace(l.acked.len());
            }
            if m.seq > l.last_seq {
                assert_eq!(
                    m.seq,
                    l.last_seq + 1,
                    "{}: gap before seq {}",
                    self.name,
                    m.seq
                );
                l.last_seq = m.seq;
                l.seen.push(m);
                if l.seen.len() >= expected {
                    break Ended::Done;
                }
            } else {
                assert_eq!(m.sender, self.name, "only own duplicates come back");
            }
        };
        sender.abort();
        ended
    }

    fn check(&self, everyone: &[&Peer]) -> Vec<(u64, String)> {
        let l = self.ledger.lock().unwrap();
        let mut keys = HashMap::new();
        for m in &l.seen {
            *keys.entry(m.idempotency_key.clone()).or_insert(0) += 1;
        }
        for peer in everyone {
            for i in 0..peer.total {
                assert_eq!(
                    keys.get(&peer.key(i)),
                    Some(&1),
                    "{} saw {} exactly once",
                    self.name,
                    peer.key(i)
                );
            }
        }
        l.seen
            .iter()
            .map(|m| (m.seq, m.idempotency_key.clone()))
            .collect()
    }
}

async fn run_until_done(peers: &[&Peer], url: &str) {
    let expected: usize = peers.iter().map(|p| p.total).sum();
    let sessions = peers.iter().map(|p| async move {
        // A member that falls a whole queue behind (a loaded machine) is
        // ended RESOURCE_EXHAUSTED with the seq to resume after, and does
        // what the status says; any other end is a failure.
        for _ in 0..20 {
            match p.session(url.to_owned(), expected).await {
                Ended::Status(status) if status.code() == Code::ResourceExhausted => {}
                ended => return ended,
            }
        }
        panic!("{} was too slow 20 times in a row", p.name);
    });
    for ended in futures::future::join_all(sessions).await {
        assert!(matches!(ended, Ended::Done), "{ended:?}");
    }
}

fn assert_same_history(peers: &[&Peer]) {
    let histories: Vec<_> = peers.iter().map(|p| p.check(peers)).collect();
    for h in &histories[1..] {
        assert_eq!(
            h, &histories[0],
            "every member saw the same messages in the same order"
        );
    }
    let seqs: Vec<u64> = histories[0].iter().map(|(s, _)| *s).collect();
    assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>());
}

#[tokio::test]
async fn sigkill_while_sending_then_restart_delivers_every_message_once() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::spawn(dir.path(), &["--set", "chat.max_batch=64"]);
    let ann = Peer::new("ann", 1000);
    let bob = Peer::new("bob", 1000);
    let expected = ann.total + bob.total;
    let url = server.url();
    let mut acked = ann.acks.subscribe();
    let killer = async {
        within("30 acknowledgments", acked.wait_for(|n| *n >= 30))
            .await
            .unwrap();
        server.signal("KILL");
    };
    let (a, b, ()) = tokio::join!(
        ann.session(url.clone(), expected),
        bob.session(url.clone(), expected),
        killer
    );
    assert!(matches!(a, Ended::Status(_)), "{a:?}");
    assert!(matches!(b, Ended::Status(_)), "{b:?}");
    drop(server);
    let acked_before: Vec<usize> = ann.ledger.lock().unwrap().acked.iter().copied().collect();
    assert!(acked_before.len() >= 30);

    let server = ServerProcess::spawn(dir.path(), &[]);
    run_until_done(&[&ann, &bob], &server.url()).await;
    assert_same_history(&[&ann, &bob]);
}

#[tokio::test]
async fn sigterm_during_heavy_traffic_drains_within_deadline_then_resume_is_exact() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = ServerProcess::spawn(
        dir.path(),
        &["--drain-timeout", "5s", "--set", "chat.max_batch=64"],
    );
    let ann = Peer::new("ann", 4000);
    let bob = Peer::new("bob", 4000);
    let expected = ann.total + bob.total;
    let url = server.url();
    let mut acked = bob.acks.subscribe();
    let stopper = async {
        within("10 acknowledgments", acked.wait_for(|n| *n >= 10))
            .await
            .unwrap();
        server.signal("TERM");
    };
    let (a, b, ()) = tokio::join!(
        ann.session(url.clone(), expected),
        bob.session(url.clone(), expected),
        stopper
    );
    for ended in [a, b] {
        match ended {
            Ended::Status(status) => assert_eq!(status.code(), Code::Unavailable, "{status:?}"),
            Ended::Done => panic!("the server stopped before all was sent"),
        }
    }
    let code = server.wait_exit(Duration::from_secs(7)).await;
    assert_eq!(code, Some(0));
    // Everything acknowledged reached every member before the end.
    {
        let a = ann.ledger.lock().unwrap();
        let b = bob.ledger.lock().unwrap();
        let seen_a: Vec<u64> = a.seen.iter().map(|m| m.seq).collect();
        let seen_b: Vec<u64> = b.seen.iter().map(|m| m.seq).collect();
        assert_eq!(seen_a, seen_b);
        assert!(seen_a.len() < expected, "stopped mid-traffic");
    }

    let server = ServerProcess::spawn(dir.path(), &[]);
    run_until_done(&[&ann, &bob], &server.url()).await;
    assert_same_history(&[&ann, &bob]);
}

#[tokio::test]
async fn cli_sends_piped_lines_and_exits_once_acknowledged() {
    use tokio::io::AsyncWriteExt;
    let server = TestServer::start().await;
    let mut watcher = join(&server, "cli").await;
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_streamhub"))
        .args(["--server", &server.url(), "--json", "chat", "--name", "bot"])
        .args(["--room", "cli", "--quiet"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(b"hi\nbye\n").await.unwrap();
    drop(stdin);
    let output = within("the client to exit", child.wait_with_output())
        .await
        .unwrap();
    assert!(output.status.success());
    let printed: Vec<serde_json::Value> = String::from_utf8(output.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let texts: Vec<(u64, &str)> = printed
        .iter()
        .filter(|v| v["kind"] == "member")
        .map(|v| (v["seq"].as_u64().unwrap(), v["message"].as_str().unwrap()))
        .collect();
    assert_eq!(texts, [(1, "hi"), (2, "bye")]);
    assert_eq!(watcher.next_member().await.message, "hi");
    assert_eq!(watcher.next_member().await.message, "bye");
    server.stop().await;
}

/// Sends `text` with idempotency key `key` to `room` without joining.
async fn send_to(
    channel: Channel,
    room: &str,
    text: &str,
    key: &str,
) -> Result<ChatMessage, Status> {
    let request = streamhub::proto::chat::SendRequest {
        room: room.into(),
        message: Some(msg("web", text, key)),
    };
    within("send", ChatServiceClient::new(channel).send(request))
        .await
        .map(tonic::Response::into_inner)
}

#[tokio::test]
async fn idle_rooms_close_free_their_slot_and_reopen_with_their_history() {
    let mut config = test_config();
    config.chat.max_rooms = 1;
    config.chat.room_idle_timeout = Duration::from_millis(100);
    let server = TestServer::start_with(config).await;
    let channel = server.channel().await;
    let kept = send_to(channel.clone(), "a", "kept", "k1").await.unwrap();
    // A member holds room "a" open: "b" finds no slot.
    let mut member = join(&server, "a").await;
    let refused = send_to(channel.clone(), "b", "no room", "")
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(
        refused.message().contains("`chat.max_rooms`"),
        "{refused:?}"
    );
    member.send(msg("ann", "still here", "")).await;
    assert_eq!(member.next_member().await.message, "still here");
    drop(member);
    // Once "a" has been idle for the timeout, its slot is free for "b".
    within("room a to close when idle", async {
        loop {
            match send_to(channel.clone(), "b", "b opens", "").await {
                Ok(_) => return,
                Err(status) if status.code() == Code::ResourceExhausted => {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                Err(status) => panic!("{status:?}"),
            }
        }
    })
    .await;
    // "b" closes in turn; "a" reopens with its history and its
    // idempotency keys.
    let again = within("room a to reopen", async {
        loop {
            match send_to(channel.clone(), "a", "kept", "k1").await {
                Ok(again) => return again,
                Err(status) if status.code() == Code::ResourceExhausted => {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                Err(status) => panic!("{status:?}"),
            }
        }
    })
    .await;
    assert_eq!(
        (again.seq, again.epoch),
        (kept.seq, kept.epoch),
        "deduplicated"
    );
    let mut member = open(
        server.channel().await,
        &[("chat-room", "a".into()), ("chat-history", "10".into())],
    )
    .await
    .unwrap();
    let texts: Vec<String> = [member.next_member().await, member.next_member().await]
        .into_iter()
        .map(|m| m.message)
        .collect();
    assert_eq!(texts, ["kept", "still here"]);
    drop(member);
    server.stop().await;
}

/// Every client-chosen name follows the room and file name rule: no
/// control characters (a newline in a sender used to be stored and sent
/// to every member), and a metadata key given twice is refused instead
/// of the first value being taken silently.
#[tokio::test]
async fn control_characters_in_names_and_repeated_metadata_are_refused() {
    let server = TestServer::start().await;
    let Err(status) = open(
        server.channel().await,
        &[("chat-room", "r".into()), ("chat-member", "ann\tx".into())],
    )
    .await
    else {
        panic!("a member name with a tab was accepted");
    };
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().starts_with("chat-member"), "{status:?}");

    for sender in ["ann\nroot: hi", "ann\r", "a\u{7f}"] {
        let mut m = join(&server, "r").await;
        m.send(msg(sender, "hi", "")).await;
        let status = m.error().await;
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert!(status.message().starts_with("sender"), "{status:?}");
    }

    let (_tx, rx) = mpsc::channel::<ChatMessage>(1);
    let mut request = tonic::Request::new(ReceiverStream::new(rx));
    for room in ["first", "second"] {
        request
            .metadata_mut()
            .append("chat-room", room.parse().unwrap());
    }
    let status = ChatServiceClient::new(server.channel().await)
        .chat(request)
        .await
        .expect_err("refused");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(
        status.message().starts_with("chat-room") && status.message().contains("2 times"),
        "{status:?}"
    );
    server.stop().await;
}
