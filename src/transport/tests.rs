//! Transport behaviour over real loopback sockets.

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
        format!("http://client-{id}"),
        peers.iter().map(|(i, a)| (*i, a.to_string())).collect(),
    );
    c.reconnect_backoff_min_ms = 10;
    c.reconnect_backoff_max_ms = 50;
    c
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
    assert_eq!(t1.peer_client_url(2).as_deref(), Some("http://client-2"));
    assert_eq!(t2.peer_client_url(1).as_deref(), Some("http://client-1"));
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
    let mut raw = TcpStream::connect(&a1).await.unwrap();
    let hello = Hello {
        version: PROTOCOL_VERSION,
        cluster_id: "test-cluster".into(),
        from: 2,
        to: 1,
        client_url: "http://client-2".into(),
    };
    write_frame(&mut raw, &hello, 1024).await.unwrap();
    let reply: HelloReply = read_frame(&mut raw, 1024).await.unwrap();
    assert!(matches!(reply, HelloReply::Accepted { .. }));
    let mut big = Vec::new();
    big.extend_from_slice(&(1u32 << 30).to_le_bytes());
    big.extend_from_slice(&[0; 4]);
    raw.write_all(&big).await.unwrap();
    let closed = tokio::time::timeout(Duration::from_secs(5), raw.read_to_end(&mut sink)).await;
    assert!(closed.is_ok(), "the oversized connection is closed");

    // Node 1 still serves its real peer.
    let (t2, _rx2) = PeerTransport::<Msg>::start_with_listener(config(2, &[(1, &a1)]), l2).unwrap();
    t2.send(1, "still here".into()).unwrap();
    assert_eq!(next_message(&mut rx1).await, (2, "still here".to_string()));
    t1.shutdown().await;
    t2.shutdown().await;
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
