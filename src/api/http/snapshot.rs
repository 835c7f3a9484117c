//! `GET /snapshot`: the whole state as one snapshot file, streamed.
//!
//! Served by the leader after a linearizable barrier, so the file holds every write
//! acknowledged before the request; a follower forwards it like any read. The body is the
//! snapshot file byte for byte (the format `wal-inspect --snapshot FILE --verify` checks), so
//! what a client receives can be verified end to end; `X-Raftkv-Snapshot-Index` and `-Term`
//! name its position, and `X-Raftkv-Cluster-Id` (percent-encoded UTF-8) the cluster, which a
//! backup records. Used by a member rejoining without its state machine, and for backups
//! (`raftkv snapshot save`).
//! The file is read in 1 MiB pieces: memory stays flat whatever the state's size.

use super::{forward, ApiState};
use crate::api::KvService;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use std::sync::Arc;
use tokio::io::AsyncReadExt;

/// The snapshot's last log index.
pub const SNAPSHOT_INDEX_HEADER: &str = "x-raftkv-snapshot-index";
/// The term of that index.
pub const SNAPSHOT_TERM_HEADER: &str = "x-raftkv-snapshot-term";
/// The cluster's id, percent-encoded (`crate::client::percent_encode`).
pub const CLUSTER_ID_HEADER: &str = "x-raftkv-cluster-id";
/// The headers a follower relays from the leader's answer.
pub const SNAPSHOT_HEADERS: [&str; 3] = [
    SNAPSHOT_INDEX_HEADER,
    SNAPSHOT_TERM_HEADER,
    CLUSTER_ID_HEADER,
];
/// Bytes read from the file per body chunk.
const STREAM_CHUNK_BYTES: usize = 1 << 20;

pub(super) async fn get_snapshot<S: KvService>(
    State(st): State<Arc<ApiState<S>>>,
    headers: HeaderMap,
) -> Response {
    let out = match st.service.snapshot().await {
        Ok(out) => out,
        Err(e) => {
            return forward(
                &st,
                e,
                Method::GET,
                "/snapshot",
                &headers,
                Bytes::new(),
                false,
            )
            .await
        }
    };
    let file = match tokio::fs::File::open(&out.path).await {
        Ok(f) => f,
        Err(e) => {
            return super::error(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("cannot open the snapshot file: {e}"),
            )
        }
    };
    let total = out.bytes;
    let stream = futures_util::stream::unfold((file, 0u64), move |(mut file, sent)| async move {
        if sent >= total {
            return None;
        }
        let want = STREAM_CHUNK_BYTES.min(usize::try_from(total - sent).unwrap_or(usize::MAX));
        let mut buf = vec![0u8; want];
        match file.read_exact(&mut buf).await {
            Ok(_) => Some((
                Ok::<_, std::io::Error>(Bytes::from(buf)),
                (file, sent + want as u64),
            )),
            // Ends the body early: the client sees a short, unverifiable file, never a
            // wrong one.
            Err(e) => Some((Err(e), (file, total))),
        }
    });
    let mut response = Body::from_stream(stream).into_response();
    let h = response.headers_mut();
    h.insert(
        "content-type",
        HeaderValue::from_static("application/octet-stream"),
    );
    h.insert("content-length", HeaderValue::from(total));
    h.insert(SNAPSHOT_INDEX_HEADER, HeaderValue::from(out.index));
    h.insert(SNAPSHOT_TERM_HEADER, HeaderValue::from(out.term));
    // Percent-encoding leaves only unreserved ASCII: always a valid header value.
    if let Ok(v) = HeaderValue::from_str(&crate::client::percent_encode(&out.cluster_id)) {
        h.insert(CLUSTER_ID_HEADER, v);
    }
    response
}
