//! Transport behaviour over real loopback sockets: delivery, backpressure, reconnects, and
//! the hostile cases — strangers, wrong secrets, foreign certificates, oversized and idle
//! pre-handshake connections.

use super::frame::{read_frame, write_frame};
use super::handshake::{Challenge, Hello, Response, Verdict};
use super::*;
use tokio::io::AsyncReadExt;

type Msg = String;

async fn bind() -> (TcpListener, String) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap().to_string();
    (l, addr)
}

fn config(id: NodeId, peers: &[(NodeId, &str)]) -> TransportConfig {
    let mut c = TransportConfig::new(
        "test-cluster",
        id,
        peers.iter().map(|(i, a)| (*i, a.to_string())).collect(),
    );
    c.reconnect_backoff_min_ms = 10;
    c.reconnect_backoff_max_ms = 50;
    c
}

/// After an attack on node 1 (`t1`, listening at `a1`): node 2 on `l2` still connects and
/// gets a message through; then both stop.
async fn still_serves_a_real_peer(
    t1: PeerTransport<Msg>,
    rx1: &mut mpsc::Receiver<TransportEvent<Msg>>,
    l2: TcpListener,
    a1: &str,
) {
    let (t2, _rx2) = PeerTransport::<Msg>::start_with_listener(config(2, &[(1, a1)]), l2).unwrap();
    t2.send(1, "still here".into()).unwrap();
    assert_eq!(next_message(rx1).await, (2, "still here".to_string()));
    t1.shutdown().await;
    t2.shutdown().await;
}

async fn next_message(rx: &mut mpsc::Receiver<TransportEvent<Msg>>) -> (NodeId, Msg) {
    loop {
        let ev = tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .expect("timed out waiting for a message")
            .expect("transport closed");
        if let TransportEvent::Message { from, message } = ev {
            return (from, message);
        }
    }
}

async fn next_unreachable(rx: &mut mpsc::Receiver<TransportEvent<Msg>>) -> NodeId {
    loop {
        let ev = tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .expect("timed out waiting for unreachable")
            .expect("transport closed");
        if let TransportEvent::Unreachable { peer } = ev {
            return peer;
        }
    }
}

#[tokio::test]
async fn two_nodes_exchange_messages_in_order() {
    let (l1, a1) = bind().await;
    let (l2, a2) = bind().await;
    let (t1, mut rx1) =
        PeerTransport::<Msg>::start_with_listener(config(1, &[(2, &a2)]), l1).unwrap();
    let (t2, mut rx2) =
        PeerTransport::<Msg>::start_with_listener(config(2, &[(1, &a1)]), l2).unwrap();
    for i in 0..100 {
        t1.send(2, format!("m{i}")).unwrap();
    }
    for i in 0..100 {
        assert_eq!(next_message(&mut rx2).await, (1, format!("m{i}")));
    }
    t2.send(1, "back".into()).unwrap();
    assert_eq!(next_message(&mut rx1).await, (2, "back".to_string()));
    assert_eq!(t1.send(9, "x".into()), Err(SendError::UnknownPeer(9)));
    t1.shutdown().await;
    t2.shutdown().await;
}

#[tokio::test]
async fn other_cluster_and_unknown_ids_are_refused() {
    let (l1, a1) = bind().await;
    let (t1, mut rx1) =
        PeerTransport::<Msg>::start_with_listener(config(1, &[(2, "127.0.0.1:1")]), l1).unwrap();

    // Right id, wrong cluster.
    let (l2, _) = bind().await;
    let mut c2 = config(2, &[(1, &a1)]);
    c2.cluster_id = "another-cluster".into();
    let (t2, mut rx2) = PeerTransport::<Msg>::start_with_listener(c2, l2).unwrap();
    t2.send(1, "sneaky".into()).unwrap();
    assert_eq!(next_unreachable(&mut rx2).await, 1);

    // Right cluster, id not a member.
    let (l3, _) = bind().await;
    let (t3, mut rx3) =
        PeerTransport::<Msg>::start_with_listener(config(3, &[(1, &a1)]), l3).unwrap();
    t3.send(1, "stranger".into()).unwrap();
    assert_eq!(next_unreachable(&mut rx3).await, 1);

    // Node 1 never delivered either message.
    let got = tokio::time::timeout(Duration::from_millis(300), async {
        loop {
            match rx1.recv().await {
                Some(TransportEvent::Message { .. }) => return true,
                Some(_) => continue,
                None => return false,
            }
        }
    })
    .await;
    assert!(
        !matches!(got, Ok(true)),
        "a refused peer's message was delivered"
    );
    for t in [t1, t2, t3] {
        t.shutdown().await;
    }
}

#[tokio::test]
async fn garbage_and_oversized_frames_close_only_that_connection() {
    let (l1, a1) = bind().await;
    let (l2, a2) = bind().await;
    let mut c1 = config(1, &[(2, &a2)]);
    c1.frame_bytes_max = 1024;
    let (t1, mut rx1) = PeerTransport::<Msg>::start_with_listener(c1, l1).unwrap();

    // Garbage instead of a handshake.
    let mut raw = TcpStream::connect(&a1).await.unwrap();
    raw.write_all(b"GET / HTTP/1.1\r\n\r\nthis is not a frame")
        .await
        .unwrap();
    let mut sink = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(5), raw.read_to_end(&mut sink)).await;
    assert!(closed.is_ok(), "the garbage connection is closed");

    // A proper peer handshakes, then sends a frame over the limit.
    let (mut raw, challenge) = raw_hello(&a1, 2, 1, "test-cluster").await;
    assert!(matches!(challenge, Challenge::Proceed { proof: None, .. }));
    write_frame(&mut raw, &Response { proof: None }, 1024)
        .await
        .unwrap();
    let verdict: Verdict = read_frame(&mut raw, 1024).await.unwrap();
    assert!(matches!(verdict, Verdict::Accepted), "{verdict:?}");
    let mut big = Vec::new();
    big.extend_from_slice(&(1u32 << 30).to_le_bytes());
    big.extend_from_slice(&[0; 4]);
    raw.write_all(&big).await.unwrap();
    let closed = tokio::time::timeout(Duration::from_secs(5), raw.read_to_end(&mut sink)).await;
    assert!(closed.is_ok(), "the oversized connection is closed");

    // Node 1 still serves its real peer.
    still_serves_a_real_peer(t1, &mut rx1, l2, &a1).await;
}

#[tokio::test]
async fn a_dead_peer_fills_its_bounded_queue_then_catches_up_on_restart() {
    let (l1, a1) = bind().await;
    let (l2, a2) = bind().await;
    drop(l2); // node 2 is down; its port refuses connections
    let mut c1 = config(1, &[(2, &a2)]);
    c1.queue_messages_max = 8;
    let (t1, mut rx1) = PeerTransport::<Msg>::start_with_listener(c1, l1).unwrap();
    assert_eq!(next_unreachable(&mut rx1).await, 2);
    let mut accepted = 0;
    let mut full = false;
    for i in 0..100 {
        match t1.send(2, format!("q{i}")) {
            Ok(()) => accepted += 1,
            Err(SendError::QueueFull(2)) => {
                full = true;
                break;
            }
            Err(e) => panic!("unexpected {e}"),
        }
    }
    assert!(full, "the queue must be bounded");
    // The writer holds at most one message outside the queue.
    assert!((8..=9).contains(&accepted), "accepted {accepted}");

    // Node 2 comes up on the same address: the queued messages arrive, in order.
    let l2 = TcpListener::bind(&a2).await.unwrap();
    let (t2, mut rx2) =
        PeerTransport::<Msg>::start_with_listener(config(2, &[(1, &a1)]), l2).unwrap();
    for i in 0..accepted {
        assert_eq!(next_message(&mut rx2).await, (1, format!("q{i}")));
    }
    t1.send(2, "after".into()).unwrap();
    assert_eq!(next_message(&mut rx2).await, (1, "after".to_string()));
    t1.shutdown().await;
    t2.shutdown().await;
}

/// A peer that restarts: both sides hear that it went away (its inbound connection to us and
/// our outbound one to it both close), and the first message sent after its restart arrives —
/// it must not be written into the dead connection and lost.
#[tokio::test]
async fn a_restarted_peer_is_noticed_at_once_and_gets_the_next_message() {
    let (l1, a1) = bind().await;
    let (l2, a2) = bind().await;
    let (t1, mut rx1) =
        PeerTransport::<Msg>::start_with_listener(config(1, &[(2, &a2)]), l1).unwrap();
    let (t2, mut rx2) =
        PeerTransport::<Msg>::start_with_listener(config(2, &[(1, &a1)]), l2).unwrap();
    t1.send(2, "before".into()).unwrap();
    assert_eq!(next_message(&mut rx2).await, (1, "before".to_string()));
    t2.send(1, "hello".into()).unwrap();
    assert_eq!(next_message(&mut rx1).await, (2, "hello".to_string()));

    // Node 2 stops: node 1 is told, without sending anything.
    t2.shutdown().await;
    drop(rx2);
    assert_eq!(next_unreachable(&mut rx1).await, 2);

    // Node 2 comes back on the same address; node 1's next message must reach it.
    let l2 = TcpListener::bind(&a2).await.unwrap();
    let (t2, mut rx2) =
        PeerTransport::<Msg>::start_with_listener(config(2, &[(1, &a1)]), l2).unwrap();
    // Wait until node 2's own connection to node 1 is up (node 1 then knows it is back).
    t2.send(1, "back".into()).unwrap();
    assert_eq!(next_message(&mut rx1).await, (2, "back".to_string()));
    t1.send(2, "first after restart".into()).unwrap();
    assert_eq!(
        next_message(&mut rx2).await,
        (1, "first after restart".to_string())
    );
    t1.shutdown().await;
    t2.shutdown().await;
}

#[test]
fn self_and_zero_ids_are_configuration_errors() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let (l, _) = bind().await;
        let err = PeerTransport::<Msg>::start_with_listener(config(1, &[(1, "x:1")]), l).err();
        assert!(matches!(err, Some(TransportError::Config(_))));
        let (l, _) = bind().await;
        let err = PeerTransport::<Msg>::start_with_listener(config(0, &[(1, "x:1")]), l).err();
        assert!(matches!(err, Some(TransportError::Config(_))));
    });
}

/// Opens a raw connection and sends a handshake `Hello` with a fixed nonce; returns the
/// acceptor's challenge.
async fn raw_hello(addr: &str, from: NodeId, to: NodeId, cluster: &str) -> (TcpStream, Challenge) {
    let mut raw = TcpStream::connect(addr).await.unwrap();
    let hello = Hello {
        version: PROTOCOL_VERSION,
        cluster_id: cluster.into(),
        from,
        to,
        nonce: [7; auth::NONCE_BYTES],
    };
    write_frame(&mut raw, &hello, 4096).await.unwrap();
    let challenge: Challenge = read_frame(&mut raw, 4096).await.unwrap();
    (raw, challenge)
}

fn secret(s: &str) -> Option<PeerSecret> {
    Some(PeerSecret::from_bytes(s.as_bytes().to_vec()).unwrap())
}

/// Asserts that no message reaches the node within `ms`.
async fn assert_no_message(rx: &mut mpsc::Receiver<TransportEvent<Msg>>, ms: u64) {
    let got = tokio::time::timeout(Duration::from_millis(ms), async {
        loop {
            match rx.recv().await {
                Some(TransportEvent::Message { from, message }) => return Some((from, message)),
                Some(_) => continue,
                None => return None,
            }
        }
    })
    .await;
    assert!(
        !matches!(got, Ok(Some(_))),
        "an unauthenticated peer's message was delivered: {got:?}"
    );
}

/// Waits until the peer closes `raw` (EOF or reset), failing after 5 s.
async fn assert_closed(raw: &mut TcpStream, what: &str) {
    let mut sink = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(5), raw.read_to_end(&mut sink)).await;
    assert!(closed.is_ok(), "{what}: the connection must be closed");
}

#[tokio::test]
async fn nodes_with_the_same_secret_exchange_messages() {
    let (l1, a1) = bind().await;
    let (l2, a2) = bind().await;
    let mut c1 = config(1, &[(2, &a2)]);
    let mut c2 = config(2, &[(1, &a1)]);
    c1.auth.secret = secret("the cluster secret");
    c2.auth.secret = secret("the cluster secret");
    let (t1, mut rx1) = PeerTransport::<Msg>::start_with_listener(c1, l1).unwrap();
    let (t2, mut rx2) = PeerTransport::<Msg>::start_with_listener(c2, l2).unwrap();
    t1.send(2, "to 2".into()).unwrap();
    assert_eq!(next_message(&mut rx2).await, (1, "to 2".to_string()));
    t2.send(1, "to 1".into()).unwrap();
    assert_eq!(next_message(&mut rx1).await, (2, "to 1".to_string()));
    t1.shutdown().await;
    t2.shutdown().await;
}

#[tokio::test]
async fn a_wrong_or_missing_secret_is_refused_and_nothing_is_delivered() {
    let (l1, a1) = bind().await;
    let mut c1 = config(1, &[(2, "127.0.0.1:1")]);
    c1.auth.secret = secret("the cluster secret");
    let (t1, mut rx1) = PeerTransport::<Msg>::start_with_listener(c1, l1).unwrap();

    // A real transport with another secret: it cannot verify node 1's proof, nor prove its own.
    let (l2, _) = bind().await;
    let mut c2 = config(2, &[(1, &a1)]);
    c2.auth.secret = secret("not the cluster secret");
    let (t2, mut rx2) = PeerTransport::<Msg>::start_with_listener(c2, l2).unwrap();
    t2.send(1, "wrong secret".into()).unwrap();
    assert_eq!(next_unreachable(&mut rx2).await, 1);

    // A real transport without a secret.
    let (l3, _) = bind().await;
    let (t3, mut rx3) =
        PeerTransport::<Msg>::start_with_listener(config(2, &[(1, &a1)]), l3).unwrap();
    t3.send(1, "no secret".into()).unwrap();
    assert_eq!(next_unreachable(&mut rx3).await, 1);

    // A hand-made dialer: a wrong proof is refused, and frames sent after it are never read.
    let (mut raw, challenge) = raw_hello(&a1, 2, 1, "test-cluster").await;
    assert!(matches!(
        challenge,
        Challenge::Proceed { proof: Some(_), .. }
    ));
    let mut forged = Vec::new();
    frame::encode_frame(
        &mut forged,
        &Response {
            proof: Some([0; 32]),
        },
        4096,
    )
    .unwrap();
    frame::encode_frame(&mut forged, &"forged".to_string(), 4096).unwrap();
    raw.write_all(&forged).await.unwrap();
    let verdict: Verdict = read_frame(&mut raw, 4096).await.unwrap();
    assert!(
        matches!(&verdict, Verdict::Refused { reason } if reason.contains("wrong proof")),
        "{verdict:?}"
    );
    assert_closed(&mut raw, "wrong proof").await;

    // A dialer that sends no proof at all.
    let (mut raw, _) = raw_hello(&a1, 2, 1, "test-cluster").await;
    write_frame(&mut raw, &Response { proof: None }, 4096)
        .await
        .unwrap();
    let verdict: Verdict = read_frame(&mut raw, 4096).await.unwrap();
    assert!(matches!(verdict, Verdict::Refused { .. }), "{verdict:?}");

    assert_no_message(&mut rx1, 300).await;
    for t in [t1, t2, t3] {
        t.shutdown().await;
    }
}

/// A dialer with a secret does not talk to an acceptor that cannot prove it (no downgrade):
/// whoever answers on a member's address must hold the secret to receive its messages.
#[tokio::test]
async fn a_dialer_with_a_secret_refuses_an_acceptor_without_one() {
    let (l1, a1) = bind().await;
    let (l2, a2) = bind().await;
    let (t1, mut rx1) =
        PeerTransport::<Msg>::start_with_listener(config(1, &[(2, &a2)]), l1).unwrap();
    let mut c2 = config(2, &[(1, &a1)]);
    c2.auth.secret = secret("the cluster secret");
    let (t2, mut rx2) = PeerTransport::<Msg>::start_with_listener(c2, l2).unwrap();
    t2.send(1, "for a member only".into()).unwrap();
    assert_eq!(next_unreachable(&mut rx2).await, 1);
    assert_no_message(&mut rx1, 300).await;
    t1.shutdown().await;
    t2.shutdown().await;
}

/// Mutual TLS settings for `id` from `pki`, trusting `ca`.
fn tls_for(pki: &crate::tls::DevPki, id: NodeId, ca: &std::path::Path) -> PeerTls {
    let n = &pki.nodes[&id];
    PeerTls {
        server: crate::tls::server_config(&n.cert, &n.key, Some(ca)).unwrap(),
        client: crate::tls::client_config(ca, Some((&n.cert, &n.key))).unwrap(),
    }
}

#[tokio::test]
async fn mutual_tls_peers_exchange_messages_with_and_without_a_secret() {
    let dir = tempfile::tempdir().unwrap();
    let pki = crate::tls::generate_dev_pki(dir.path(), &[1, 2], &["127.0.0.1"]).unwrap();
    for with_secret in [false, true] {
        let (l1, a1) = bind().await;
        let (l2, a2) = bind().await;
        let mut c1 = config(1, &[(2, &a2)]);
        let mut c2 = config(2, &[(1, &a1)]);
        c1.auth.tls = Some(tls_for(&pki, 1, &pki.ca_cert));
        c2.auth.tls = Some(tls_for(&pki, 2, &pki.ca_cert));
        if with_secret {
            c1.auth.secret = secret("the cluster secret");
            c2.auth.secret = secret("the cluster secret");
        }
        let (t1, mut rx1) = PeerTransport::<Msg>::start_with_listener(c1, l1).unwrap();
        let (t2, mut rx2) = PeerTransport::<Msg>::start_with_listener(c2, l2).unwrap();
        for i in 0..20 {
            t1.send(2, format!("m{i}")).unwrap();
        }
        for i in 0..20 {
            assert_eq!(next_message(&mut rx2).await, (1, format!("m{i}")));
        }
        t2.send(1, "back".into()).unwrap();
        assert_eq!(next_message(&mut rx1).await, (2, "back".to_string()));
        t1.shutdown().await;
        t2.shutdown().await;
    }
}

#[tokio::test]
async fn a_client_certificate_from_another_ca_or_plain_tcp_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let pki = crate::tls::generate_dev_pki(&dir.path().join("a"), &[1], &["127.0.0.1"]).unwrap();
    let other = crate::tls::generate_dev_pki(&dir.path().join("b"), &[2], &["127.0.0.1"]).unwrap();
    let (l1, a1) = bind().await;
    let mut c1 = config(1, &[(2, "127.0.0.1:1")]);
    c1.auth.tls = Some(tls_for(&pki, 1, &pki.ca_cert));
    let (t1, mut rx1) = PeerTransport::<Msg>::start_with_listener(c1, l1).unwrap();

    // Node 2 trusts node 1's CA (so it accepts node 1's certificate) but its own certificate
    // comes from another CA: node 1 refuses it.
    let (l2, _) = bind().await;
    let mut c2 = config(2, &[(1, &a1)]);
    let n2 = &other.nodes[&2];
    c2.auth.tls = Some(PeerTls {
        server: crate::tls::server_config(&n2.cert, &n2.key, Some(&other.ca_cert)).unwrap(),
        client: crate::tls::client_config(&pki.ca_cert, Some((&n2.cert, &n2.key))).unwrap(),
    });
    let (t2, mut rx2) = PeerTransport::<Msg>::start_with_listener(c2, l2).unwrap();
    t2.send(1, "foreign certificate".into()).unwrap();
    assert_eq!(next_unreachable(&mut rx2).await, 1);

    // A plain-TCP transport: its handshake is not TLS.
    let (l3, _) = bind().await;
    let (t3, mut rx3) =
        PeerTransport::<Msg>::start_with_listener(config(2, &[(1, &a1)]), l3).unwrap();
    t3.send(1, "plain tcp".into()).unwrap();
    assert_eq!(next_unreachable(&mut rx3).await, 1);

    // A plain-TCP hand-made handshake gets no TLS-less answer.
    let mut raw = TcpStream::connect(&a1).await.unwrap();
    let hello = Hello {
        version: PROTOCOL_VERSION,
        cluster_id: "test-cluster".into(),
        from: 2,
        to: 1,
        nonce: [0; auth::NONCE_BYTES],
    };
    let _ = write_frame(&mut raw, &hello, 4096).await;
    assert!(
        read_frame::<_, Challenge>(&mut raw, 4096).await.is_err(),
        "a plain handshake must not be answered"
    );

    assert_no_message(&mut rx1, 300).await;
    for t in [t1, t2, t3] {
        t.shutdown().await;
    }
}

/// Before the handshake completes only `handshake_bytes_max` is accepted: a 16 MiB frame
/// header is refused without reading (or allocating) its payload, and so is a `Hello` just
/// over the limit.
#[tokio::test]
async fn large_frames_before_the_handshake_are_refused_at_the_header() {
    let (l1, a1) = bind().await;
    let (l2, a2) = bind().await;
    let c1 = config(1, &[(2, &a2)]);
    assert_eq!(c1.handshake_bytes_max, 4096);
    assert_eq!(c1.frame_bytes_max, 16 << 20);
    let (t1, mut rx1) = PeerTransport::<Msg>::start_with_listener(c1, l1).unwrap();

    // A whole 16 MiB frame: the node refuses it at the header and closes, so writing the
    // payload fails — had the node read (and buffered) it, the write would succeed.
    let mut raw = TcpStream::connect(&a1).await.unwrap();
    let mut big = Vec::with_capacity((16 << 20) + 8);
    big.extend_from_slice(&(16u32 << 20).to_le_bytes());
    big.extend_from_slice(&[0; 4]);
    big.resize((16 << 20) + 8, 0);
    let written = tokio::time::timeout(Duration::from_secs(5), raw.write_all(&big)).await;
    assert!(
        matches!(written, Ok(Err(_))),
        "the node must close before reading a 16 MiB pre-handshake payload: {written:?}"
    );

    let mut raw = TcpStream::connect(&a1).await.unwrap();
    let hello = Hello {
        version: PROTOCOL_VERSION,
        cluster_id: "x".repeat(4096),
        from: 2,
        to: 1,
        nonce: [0; auth::NONCE_BYTES],
    };
    let _ = write_frame(&mut raw, &hello, 1 << 20).await;
    assert_closed(&mut raw, "oversized hello").await;

    still_serves_a_real_peer(t1, &mut rx1, l2, &a1).await;
}

/// 200 connections that never handshake: at most `pending_handshakes_max` are kept (the rest
/// are closed at once), those time out, and a real peer gets through meanwhile.
#[tokio::test]
async fn idle_pre_handshake_connections_do_not_lock_out_a_real_peer() {
    let (l1, a1) = bind().await;
    let (l2, a2) = bind().await;
    let mut c1 = config(1, &[(2, &a2)]);
    c1.auth.secret = secret("the cluster secret");
    c1.pending_handshakes_max = 16;
    c1.handshake_timeout_ms = 500;
    let (t1, mut rx1) = PeerTransport::<Msg>::start_with_listener(c1, l1).unwrap();
    let mut idle = Vec::new();
    for _ in 0..200 {
        idle.push(TcpStream::connect(&a1).await.unwrap());
    }
    // Every connection over the cap is closed at once; the capped ones by the timeout.
    let mut closed_at_once = 0;
    for raw in idle.iter_mut() {
        let mut byte = [0u8; 1];
        let r = tokio::time::timeout(Duration::from_millis(200), raw.read(&mut byte)).await;
        if matches!(r, Ok(Ok(0)) | Ok(Err(_))) {
            closed_at_once += 1;
        }
    }
    assert!(
        closed_at_once >= 200 - 16,
        "only {closed_at_once} of 200 idle connections were closed at once"
    );

    let mut c2 = config(2, &[(1, &a1)]);
    c2.auth.secret = secret("the cluster secret");
    let (t2, _rx2) = PeerTransport::<Msg>::start_with_listener(c2, l2).unwrap();
    t2.send(1, "real peer".into()).unwrap();
    assert_eq!(next_message(&mut rx1).await, (2, "real peer".to_string()));
    for raw in idle.iter_mut() {
        assert_closed(raw, "idle pre-handshake connection").await;
    }
    t1.shutdown().await;
    t2.shutdown().await;
}

/// The version 1 handshake carried a client URL that the acceptor stored and served to
/// clients as the dialer's; it is refused now (URLs come from configuration), and the
/// version 2 handshake has no field for one.
#[tokio::test]
async fn a_version_1_handshake_with_a_client_url_is_refused() {
    #[derive(Serialize)]
    struct HelloV1 {
        version: u32,
        cluster_id: String,
        from: NodeId,
        to: NodeId,
        client_url: String,
    }
    let (l1, a1) = bind().await;
    let (t1, mut rx1) =
        PeerTransport::<Msg>::start_with_listener(config(1, &[(2, "127.0.0.1:1")]), l1).unwrap();
    let mut raw = TcpStream::connect(&a1).await.unwrap();
    let forged = HelloV1 {
        version: 1,
        cluster_id: "test-cluster".into(),
        from: 2,
        to: 1,
        client_url: "http://attacker.example".into(),
    };
    write_frame(&mut raw, &forged, 4096).await.unwrap();
    // Either refused by version or undecodable: never accepted.
    match read_frame::<_, Challenge>(&mut raw, 4096).await {
        Ok(Challenge::Refused { .. }) | Err(_) => {}
        Ok(c) => panic!("a version 1 handshake was answered with {c:?}"),
    }
    assert_closed(&mut raw, "version 1 handshake").await;
    assert_no_message(&mut rx1, 100).await;
    t1.shutdown().await;
}

#[test]
fn tls_server_names_come_from_the_peer_address() {
    use rustls::pki_types::ServerName;
    assert!(matches!(
        server_name("127.0.0.1:9001").unwrap(),
        ServerName::IpAddress(_)
    ));
    assert!(matches!(
        server_name("[::1]:9001").unwrap(),
        ServerName::IpAddress(_)
    ));
    assert!(matches!(
        server_name("node-1.example:9001").unwrap(),
        ServerName::DnsName(_)
    ));
    assert!(server_name("bad name!:1").is_err());
}

fn start(
    config: TransportConfig,
    l: TcpListener,
) -> (PeerTransport<Msg>, mpsc::Receiver<TransportEvent<Msg>>) {
    PeerTransport::<Msg>::start_with_listener(config, l).unwrap()
}

fn peers(list: &[(NodeId, &str)]) -> BTreeMap<NodeId, String> {
    list.iter().map(|(i, a)| (*i, a.to_string())).collect()
}

/// Two transports that start with no peers add each other at run time (one of them from a
/// thread outside the runtime) and messages flow both ways; the new member's traffic is
/// counted in series created for it.
#[tokio::test]
async fn peers_added_at_run_time_exchange_messages_both_ways() {
    let (l1, a1) = bind().await;
    let (l2, a2) = bind().await;
    let metrics = Arc::new(crate::metrics::Metrics::standalone());
    let mut c1 = config(1, &[]);
    c1.metrics = Some(metrics.clone());
    let (t1, mut rx1) = start(c1, l1);
    let (t2, mut rx2) = start(config(2, &[]), l2);
    assert_eq!(
        t1.send(2, "too early".into()),
        Err(SendError::UnknownPeer(2))
    );
    assert!(metrics.peer(2).is_none());

    std::thread::scope(|s| {
        s.spawn(|| t1.set_peers(peers(&[(2, &a2)])));
    });
    t2.set_peers(peers(&[(1, &a1)]));
    assert_eq!(t1.peers(), peers(&[(2, &a2)]));
    assert_eq!(t2.peers(), peers(&[(1, &a1)]));
    assert!(metrics.peer(2).is_some(), "the new member has series");

    for i in 0..10 {
        t1.send(2, format!("m{i}")).unwrap();
    }
    for i in 0..10 {
        assert_eq!(next_message(&mut rx2).await, (1, format!("m{i}")));
    }
    t2.send(1, "back".into()).unwrap();
    assert_eq!(next_message(&mut rx1).await, (2, "back".to_string()));
    // The reader counts a frame before handing it over.
    assert!(metrics.peer(2).unwrap().received_bytes.get() > 0);

    // The same set again changes nothing: the links stay up and in order.
    t1.set_peers(peers(&[(2, &a2)]));
    t1.send(2, "again".into()).unwrap();
    assert_eq!(next_message(&mut rx2).await, (1, "again".to_string()));
    t1.shutdown().await;
    t2.shutdown().await;
}

/// A removed peer: `send` to it fails, both connections with it close, a new handshake from
/// it is refused, and what it sends is not delivered.
#[tokio::test]
async fn a_removed_peer_is_disconnected_and_refused() {
    let (l1, a1) = bind().await;
    let (l2, a2) = bind().await;
    let metrics = Arc::new(crate::metrics::Metrics::new([2]));
    let mut c1 = config(1, &[(2, &a2)]);
    c1.metrics = Some(metrics.clone());
    let (t1, mut rx1) = start(c1, l1);
    let (t2, mut rx2) = start(config(2, &[(1, &a1)]), l2);
    t1.send(2, "before".into()).unwrap();
    assert_eq!(next_message(&mut rx2).await, (1, "before".to_string()));
    t2.send(1, "before".into()).unwrap();
    assert_eq!(next_message(&mut rx1).await, (2, "before".to_string()));

    t1.set_peers(BTreeMap::new());
    assert!(t1.peers().is_empty());
    assert_eq!(t1.send(2, "after".into()), Err(SendError::UnknownPeer(2)));
    assert_eq!(
        t1.send_wait(2, "after".into()).await,
        Err(SendError::UnknownPeer(2))
    );
    assert!(
        metrics.peer(2).is_none(),
        "a removed member loses its series"
    );
    // Node 2 hears both connections close: node 1's writer stopped, and node 1 closed
    // node 2's inbound connection.
    assert_eq!(next_unreachable(&mut rx2).await, 1);
    assert_eq!(next_unreachable(&mut rx2).await, 1);

    let (mut raw, challenge) = raw_hello(&a1, 2, 1, "test-cluster").await;
    assert!(
        matches!(&challenge, Challenge::Refused { reason } if reason.contains("not a member")),
        "{challenge:?}"
    );
    assert_closed(&mut raw, "a removed member's handshake").await;
    let _ = t2.send(1, "from a removed member".into());
    assert_no_message(&mut rx1, 300).await;
    t1.shutdown().await;
    t2.shutdown().await;
}

/// A peer whose address changes: the old link stops (the old address hears it close) and
/// messages go to whoever holds the id at the new address.
#[tokio::test]
async fn a_changed_address_sends_to_the_new_one() {
    let (l1, a1) = bind().await;
    let (l2, a2) = bind().await;
    let (t1, mut rx1) = start(config(1, &[(2, &a2)]), l1);
    let (t2, mut rx2) = start(config(2, &[(1, &a1)]), l2);
    t1.send(2, "to the old address".into()).unwrap();
    assert_eq!(
        next_message(&mut rx2).await,
        (1, "to the old address".to_string())
    );

    let (l3, a3) = bind().await;
    let (t3, mut rx3) = start(config(2, &[(1, &a1)]), l3);
    t1.set_peers(peers(&[(2, &a3)]));
    assert_eq!(t1.peers(), peers(&[(2, &a3)]));
    assert_eq!(next_unreachable(&mut rx2).await, 1, "the old link closed");
    t1.send(2, "to the new address".into()).unwrap();
    assert_eq!(
        next_message(&mut rx3).await,
        (1, "to the new address".to_string())
    );
    // Node 2 is still a member: its inbound connections are accepted.
    t3.send(1, "from the new address".into()).unwrap();
    assert_eq!(
        next_message(&mut rx1).await,
        (2, "from the new address".to_string())
    );
    assert_no_message(&mut rx2, 100).await;
    for t in [t1, t2, t3] {
        t.shutdown().await;
    }
}

#[test]
fn set_peers_skips_itself_id_zero_bad_tls_names_and_the_excess() {
    let given = peers(&[(0, "a:1"), (1, "me:1"), (2, "b:1"), (3, "bad name!:1")]);
    assert_eq!(
        admissible_peers(1, false, given.clone()),
        peers(&[(2, "b:1"), (3, "bad name!:1")])
    );
    assert_eq!(admissible_peers(1, true, given), peers(&[(2, "b:1")]));
    let many: BTreeMap<NodeId, String> = (2..(PEERS_MAX as NodeId + 12))
        .map(|id| (id, format!("n{id}:1")))
        .collect();
    let admitted = admissible_peers(1, false, many);
    assert_eq!(admitted.len(), PEERS_MAX);
    assert_eq!(
        admitted.keys().next_back(),
        Some(&(PEERS_MAX as NodeId + 1))
    );
}

#[test]
fn more_than_peers_max_at_start_is_a_configuration_error() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let (l, _) = bind().await;
        let mut c = config(1, &[]);
        c.peers = (2..(PEERS_MAX as NodeId + 3))
            .map(|id| (id, format!("n{id}:1")))
            .collect();
        let err = PeerTransport::<Msg>::start_with_listener(c, l).err();
        assert!(matches!(err, Some(TransportError::Config(_))));
    });
}
