//! End-to-end tests of `wal-inspect` on snapshot files and decoded commands: data dirs are
//! written through the real `NodeStorage` (append, apply, compact, snapshot files), then
//! damaged by hand. Everything is deterministic: the command at each index is a pure
//! function of the index, and the expected keys come from a model map.

use raftkv_storage::command::Command;
use raftkv_storage::node_storage::{NodeStorage, NodeStorageOptions};
use raftkv_storage::snapshot::{file_name, SnapshotOptions};
use raftkv_storage::wal::WalOptions;
use raftkv_storage::{Entry, EntryKind, HardState};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command as Process, Output};

const BIN: &str = env!("CARGO_BIN_EXE_wal-inspect");

fn inspect(args: &[&str]) -> Output {
    Process::new(BIN).args(args).output().unwrap()
}

fn text(out: &Output) -> String {
    format!(
        "--- stdout\n{}--- stderr\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn json(out: &Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("bad JSON ({e}):\n{}", text(out)))
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// The command at `index`: puts to `user/NNN` (35 keys), every 7th a delete, every 11th a put
/// of a binary key, every 13th a put to `cfg/…`.
fn command_at(index: u64) -> Command {
    if index.is_multiple_of(13) {
        return Command::Put {
            key: format!("cfg/{}", index % 3).into_bytes(),
            value: format!("c{index}").into_bytes(),
        };
    }
    if index.is_multiple_of(11) {
        return Command::Put {
            key: vec![0xff, 0x00, (index % 4) as u8],
            value: vec![0xee; 100],
        };
    }
    let key = format!("user/{:03}", (index * 3) % 35).into_bytes();
    if index.is_multiple_of(7) {
        Command::Delete { key }
    } else {
        Command::Put {
            key,
            value: format!("v{index}").into_bytes(),
        }
    }
}

fn model_upto(applied: u64) -> BTreeMap<Vec<u8>, Vec<u8>> {
    let mut m = BTreeMap::new();
    for i in 1..=applied {
        match command_at(i) {
            Command::Put { key, value } => {
                m.insert(key, value);
            }
            Command::Delete { key } => {
                m.remove(&key);
            }
            other => unreachable!("the workload writes only puts and deletes: {other:?}"),
        }
    }
    m
}

fn opts() -> NodeStorageOptions {
    NodeStorageOptions {
        wal: WalOptions {
            segment_bytes_max: 16 << 10,
            ..WalOptions::default()
        },
        snapshot: SnapshotOptions {
            keep: 2,
            // Several pairs chunks per file, so damage can be placed in a middle one.
            chunk_target_bytes: 128,
        },
        snapshot_every: 1_000_000,
        // Keep every entry in the WAL, so `--entries` sees them all.
        catchup_margin: 1_000_000,
        ..NodeStorageOptions::default()
    }
}

/// Appends entries `first..=last` at `term` as committed and applies them.
fn write(s: &mut NodeStorage, first: u64, last: u64, term: u64) {
    let entries: Vec<Entry> = (first..=last)
        .map(|index| Entry {
            index,
            term,
            kind: EntryKind::Normal,
            payload: command_at(index).encode().unwrap().into(),
        })
        .collect();
    let hs = HardState {
        term,
        vote: Some(1),
        commit: last,
    };
    s.append(&entries, Some(&hs)).unwrap();
    s.apply_committed(last).unwrap();
}

/// A data dir with two snapshot files: at (60, term 1) and (100, term 2), then 5 more entries.
/// Returns the dir and the two files' paths, older first.
fn build_data_dir() -> (tempfile::TempDir, PathBuf, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("node");
    let mut s = NodeStorage::open(&dir, opts()).unwrap();
    write(&mut s, 1, 60, 1);
    s.compact(None).unwrap();
    let first = s.create_snapshot_file().unwrap();
    assert_eq!((first.meta.index, first.meta.term), (60, 1));
    write(&mut s, 61, 100, 2);
    let second = s.create_snapshot_file().unwrap();
    assert_eq!((second.meta.index, second.meta.term), (100, 2));
    write(&mut s, 101, 105, 2);
    drop(s);
    let snap = dir.join("snap");
    (
        tmp,
        snap.join(file_name(60, 1)),
        snap.join(file_name(100, 2)),
    )
}

fn data_dir(tmp: &tempfile::TempDir) -> PathBuf {
    tmp.path().join("node")
}

fn flip_byte(file: &Path, offset: u64) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(file)
        .unwrap();
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, offset).unwrap();
    f.write_all_at(&[b[0] ^ 0x10], offset).unwrap();
}

/// The byte offsets of the chunks in a snapshot file, walked from the format's documented
/// framing (64-byte header; chunk = 16-byte header with the payload length at +4, payload).
fn chunk_offsets(file: &Path) -> Vec<u64> {
    let bytes = std::fs::read(file).unwrap();
    let mut at = 64usize;
    let mut offsets = Vec::new();
    while at < bytes.len() {
        offsets.push(at as u64);
        let len = u32::from_le_bytes(bytes[at + 4..at + 8].try_into().unwrap()) as usize;
        at += 16 + len;
    }
    assert_eq!(at, bytes.len(), "chunks tile the file");
    offsets
}

/// Files in a directory, sorted by name, with their sizes: to show the tool changed nothing.
fn listing(dir: &Path) -> Vec<(String, u64)> {
    let mut files: Vec<(String, u64)> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (
                e.file_name().to_string_lossy().into_owned(),
                e.metadata().unwrap().len(),
            )
        })
        .collect();
    files.sort();
    files
}

/// What `BytesView::key` shows for a key: text, or hex when it is not printable.
fn shown_key(key: &[u8]) -> String {
    match std::str::from_utf8(key) {
        Ok(t) if !t.chars().any(char::is_control) => format!("{t:?}"),
        _ => format!(
            "hex:{}",
            key.iter().map(|b| format!("{b:02x}")).collect::<String>()
        ),
    }
}

#[test]
fn summary_and_verify_list_every_snapshot_with_index_term_and_keys() {
    let (tmp, older, newer) = build_data_dir();
    let dir = data_dir(&tmp);
    let snap = dir.join("snap");
    // A crashed snapshot's temp file and one recovery set aside: listed, never judged.
    std::fs::write(snap.join(format!("{}.tmp", file_name(120, 2))), b"partial").unwrap();
    std::fs::write(snap.join(format!("{}.broken", file_name(40, 1))), b"junk").unwrap();
    let before = listing(&snap);

    let out = inspect(&[s(&dir), "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let v = json(&out);
    assert_eq!(v["verdict"], "clean");
    assert_eq!(v["wal_verdict"], "clean");
    let snaps = &v["snapshots"];
    assert_eq!(snaps["dir"], s(&snap));
    assert_eq!(snaps["verdict"], "clean");
    let files = snaps["snapshots"].as_array().unwrap();
    assert_eq!(files.len(), 2, "{snaps:#}");
    for (f, path, index, term) in [(&files[0], &older, 60, 1), (&files[1], &newer, 100, 2)] {
        assert_eq!(f["file"], path.file_name().unwrap().to_str().unwrap());
        assert_eq!(f["path"], s(path));
        assert_eq!(
            (f["index"].as_u64(), f["term"].as_u64()),
            (Some(index), Some(term))
        );
        assert_eq!(f["key_count"], model_upto(index).len());
        // The records also hold the watch history: one per change, so more than the keys.
        assert!(
            f["record_count"].as_u64() > f["key_count"].as_u64(),
            "{f:#}"
        );
        assert_eq!(f["file_bytes"], std::fs::metadata(path).unwrap().len());
        assert_eq!(f["status"], "ok");
        assert!(f["damage"].is_null());
        assert_eq!(f["voters"], serde_json::json!([]));
    }
    assert_eq!(snaps["newest_verified"], file_name(100, 2));
    let unjudged: Vec<(&str, &str)> = snaps["not_judged"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| (f["file"].as_str().unwrap(), f["kind"].as_str().unwrap()))
        .collect();
    let tmp_name = format!("{}.tmp", file_name(120, 2));
    let broken_name = format!("{}.broken", file_name(40, 1));
    assert_eq!(
        unjudged,
        vec![
            (broken_name.as_str(), "broken"),
            (tmp_name.as_str(), "temp")
        ]
    );

    let out = inspect(&[s(&dir)]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let t = text(&out);
    let row = t
        .lines()
        .find(|l| l.contains(&file_name(100, 2)) && !l.contains("newest"))
        .unwrap_or_else(|| panic!("no row for the newer snapshot:\n{t}"));
    let cols: Vec<&str> = row.split_whitespace().collect();
    let keys = model_upto(100).len().to_string();
    let bytes = std::fs::metadata(&newer).unwrap().len().to_string();
    assert_eq!(
        [&cols[1..5], &cols[6..]].concat(),
        ["100", "2", bytes.as_str(), keys.as_str(), "ok"],
        "{t}"
    );
    // Between the keys and the status: the header's record count (keys and history).
    let records: u64 = cols[5].parse().unwrap();
    assert!(records > model_upto(100).len() as u64, "{t}");
    assert!(t.contains("not judged:") && t.contains(&tmp_name), "{t}");

    let out = inspect(&[s(&dir), "--verify"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let t = text(&out);
    assert!(t.contains(&format!("CLEAN: snapshots {}", s(&snap))), "{t}");
    assert!(
        t.contains("checked 2 snapshot files: 2 verified, 0 failed"),
        "{t}"
    );

    // The snapshot directory alone, named directly or through its data dir.
    for target in [&snap, &dir] {
        let out = inspect(&["--snapshots", s(target), "--verify", "--json"]);
        assert_eq!(out.status.code(), Some(0), "{}", text(&out));
        let v = json(&out);
        assert_eq!(v["verdict"], "clean");
        assert_eq!(v["snapshots"].as_array().unwrap().len(), 2);
    }

    // One file on its own.
    let out = inspect(&["--snapshot", s(&older), "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let v = json(&out);
    assert_eq!(
        (v["index"].as_u64(), v["term"].as_u64()),
        (Some(60), Some(1))
    );
    assert_eq!(v["status"], "ok");

    // Read-only: the temp file is still there, nothing changed.
    assert_eq!(listing(&snap), before);
}

#[test]
fn a_flipped_byte_in_a_snapshot_fails_verify_naming_the_file_and_chunk() {
    let (tmp, older, newer) = build_data_dir();
    let dir = data_dir(&tmp);
    let chunks = chunk_offsets(&newer);
    assert!(chunks.len() >= 5, "want several pairs chunks: {chunks:?}");
    // A payload byte of a middle chunk: its CRC fails, at that chunk's offset.
    let chunk = chunks[chunks.len() / 2];
    flip_byte(&newer, chunk + 20);

    let out = inspect(&[s(&dir), "--verify"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let t = text(&out);
    assert!(
        t.contains(&format!("CORRUPT SNAPSHOT: {}", s(&newer))),
        "{t}"
    );
    assert!(t.contains(&format!("byte offset:     {chunk} ")), "{t}");
    assert!(t.contains("CRC mismatch"), "{t}");
    assert!(
        !t.contains(&format!("CORRUPT SNAPSHOT: {}", s(&older))),
        "{t}"
    );
    assert!(
        t.contains("verdict: corrupt (WAL clean, snapshots corrupt)"),
        "{t}"
    );

    let out = inspect(&[s(&dir), "--verify", "--json"]);
    assert_eq!(out.status.code(), Some(1));
    let v = json(&out);
    assert_eq!(
        (v["verdict"].as_str(), v["exit_code"].as_u64()),
        (Some("corrupt"), Some(1))
    );
    assert_eq!(v["wal_verdict"], "clean");
    let files = v["snapshots"]["snapshots"].as_array().unwrap();
    assert_eq!(files[0]["status"], "ok");
    assert_eq!(files[1]["status"], "damaged");
    assert_eq!(files[1]["path"], s(&newer));
    assert_eq!(files[1]["damage"]["offset"], chunk);
    // The header still reads: its record count is shown; the key count, read from the
    // records, is unknown past the damage.
    assert!(files[1]["record_count"].as_u64() > Some(model_upto(100).len() as u64));
    assert!(files[1]["key_count"].is_null(), "{:#}", files[1]);
    // Recovery would fall back to the older one.
    assert_eq!(v["snapshots"]["newest_verified"], file_name(60, 1));

    // The summary exits with the same verdict and marks the file.
    let out = inspect(&[s(&dir)]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        text(&out).contains(&format!("damaged at byte offset {chunk}: chunk")),
        "{}",
        text(&out)
    );

    flip_byte(&newer, chunk + 20);
    assert_eq!(inspect(&[s(&dir), "--verify"]).status.code(), Some(0));

    // A damaged header: nothing in the file can be read, not even the key count.
    flip_byte(&older, 20);
    let out = inspect(&["--snapshots", s(&dir), "--verify", "--json"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let f = &json(&out)["snapshots"][0];
    assert_eq!(f["status"], "damaged");
    assert_eq!(f["damage"]["offset"], 0);
    assert!(f["key_count"].is_null());
    assert!(f["damage"]["reason"]
        .as_str()
        .unwrap()
        .contains("header CRC"));
}

#[test]
fn keys_lists_exactly_the_matching_keys_in_order() {
    let (_tmp, _older, newer) = build_data_dir();
    let model = model_upto(100);
    let expected: Vec<&Vec<u8>> = model.keys().filter(|k| k.starts_with(b"user/0")).collect();
    assert!(expected.len() >= 5, "{expected:?}");

    let out = inspect(&["--snapshot", s(&newer), "--keys", "user/0"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let stdout = String::from_utf8(out.stdout.clone()).unwrap();
    let lines: Vec<&str> = stdout.lines().collect();
    assert!(lines[0].contains("index 100, term 2"), "{stdout}");
    assert_eq!(lines.len(), 1 + expected.len() + 1, "{stdout}");
    for (line, key) in lines[1..].iter().zip(&expected) {
        let value = &model[*key];
        let want = format!(
            "{}  ({} bytes)  {:?}",
            shown_key(key),
            value.len(),
            String::from_utf8_lossy(value)
        );
        assert_eq!(*line, want, "{stdout}");
    }
    assert!(
        lines.last().unwrap().contains(&format!(
            "{} of {} keys listed; the whole file verified",
            expected.len(),
            model.len()
        )),
        "{stdout}"
    );

    let out = inspect(&["--snapshot", s(&newer), "--keys", "user/0", "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let v = json(&out);
    assert_eq!(v["verdict"], "clean");
    assert_eq!(v["keys_listed"], expected.len());
    assert_eq!(v["keys_read"], model.len());
    assert_eq!(v["prefix"]["value"], "user/0");
    let keys: Vec<&str> = v["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["key"]["value"].as_str().unwrap())
        .collect();
    let want: Vec<String> = expected
        .iter()
        .map(|k| String::from_utf8(k.to_vec()).unwrap())
        .collect();
    assert_eq!(keys, want);
    assert_eq!(v["keys"][0]["value_bytes"], model[expected[0]].len());

    // No prefix: every key, binary ones in hex, in the store's (bytewise) order.
    let v = json(&inspect(&["--snapshot", s(&newer), "--keys", "--json"]));
    let all: Vec<String> = v["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| {
            let key = &k["key"];
            match key["format"].as_str().unwrap() {
                "text" => format!("{:?}", key["value"].as_str().unwrap()),
                f => format!("{f}:{}", key["value"].as_str().unwrap()),
            }
        })
        .collect();
    let want: Vec<String> = model.keys().map(|k| shown_key(k)).collect();
    assert_eq!(all, want);
    assert!(all.last().unwrap().starts_with("hex:ff00"), "{all:?}");
    let binary = v["keys"].as_array().unwrap().last().unwrap();
    assert_eq!(binary["value_bytes"], 100);
    assert_eq!(binary["value"]["format"], "hex");

    // A prefix nothing has: no keys, still a verified file.
    let v = json(&inspect(&[
        "--snapshot",
        s(&newer),
        "--keys",
        "zzz",
        "--json",
    ]));
    assert_eq!(v["keys"].as_array().unwrap().len(), 0);
    assert_eq!(v["exit_code"], 0);
}

#[test]
fn keys_stop_at_damage_and_say_where() {
    let (_tmp, _older, newer) = build_data_dir();
    let model = model_upto(100);
    let chunks = chunk_offsets(&newer);
    // An early chunk, among the key records (`d ‖ key`): the bookkeeping records (`c/…`)
    // come before them and the watch history (`h ‖ …`) after.
    let chunk = chunks[4];
    flip_byte(&newer, chunk + 17);

    let out = inspect(&["--snapshot", s(&newer), "--keys", "--json"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let v = json(&out);
    assert_eq!(v["verdict"], "corrupt");
    assert_eq!(v["damage"]["offset"], chunk);
    let listed = v["keys"].as_array().unwrap().len();
    assert!(listed > 0 && listed < model.len(), "{listed}");
    assert_eq!(v["keys_listed"], listed);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(s(&newer)) && err.contains(&format!("byte offset {chunk}")),
        "{err}"
    );

    let out = inspect(&["--snapshot", s(&newer), "--keys"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        text(&out).contains("the file does not verify"),
        "{}",
        text(&out)
    );

    // Damage in the header: no keys at all, the JSON is still one document.
    flip_byte(&newer, chunk + 17);
    flip_byte(&newer, 3);
    let out = inspect(&["--snapshot", s(&newer), "--keys", "user/", "--json"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let v = json(&out);
    assert_eq!(v["keys"].as_array().unwrap().len(), 0);
    assert_eq!(v["damage"]["offset"], 0);
    assert!(v["index"].is_null());

    // A missing file is an error, not a panic.
    let out = inspect(&["--snapshot", s(&newer.with_extension("nope")), "--keys"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("is not a file"), "{}", text(&out));
}

#[test]
fn entries_show_decoded_puts_and_deletes() {
    let (tmp, _older, _newer) = build_data_dir();
    let dir = data_dir(&tmp);

    let out = inspect(&[s(&dir), "--entries", "62..=66"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let stdout = String::from_utf8(out.stdout.clone()).unwrap();
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 1 + 5, "{stdout}");
    for (line, index) in lines[1..].iter().zip(62u64..) {
        let want = match command_at(index) {
            Command::Put { key, value } => {
                format!("put {} ({} bytes)", shown_key(&key), value.len())
            }
            Command::Delete { key } => format!("del {}", shown_key(&key)),
            other => unreachable!("the workload writes only puts and deletes: {other:?}"),
        };
        assert!(
            line.ends_with(&want),
            "entry {index}: want {want}\n{stdout}"
        );
        assert!(
            line.trim_start().starts_with(&index.to_string()),
            "{stdout}"
        );
    }
    // 63 is a delete, 66 a put of a binary key.
    assert!(lines[2].ends_with("del \"user/014\""), "{stdout}");
    assert!(lines[5].ends_with("put hex:ff0002 (100 bytes)"), "{stdout}");

    let out = inspect(&[s(&dir), "--entries", "63..=66", "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let v = json(&out);
    let del = &v["entries"][0]["payload"];
    assert_eq!(del["format"], "command");
    assert_eq!(del["command"]["op"], "del");
    assert_eq!(del["command"]["key"]["value"], "user/014");
    let put = &v["entries"][1]["payload"];
    assert_eq!(put["command"]["op"], "put");
    assert_eq!(put["command"]["value_bytes"], 3);
    assert_eq!(put["command"]["value"]["value"], "v64");
    assert!(put.get("not_a_command").is_none());

    // A Normal entry that is not a command is shown raw, and says so.
    let mut s_ = NodeStorage::open(&dir, opts()).unwrap();
    let odd = Entry {
        index: 106,
        term: 2,
        kind: EntryKind::Normal,
        payload: b"not a command".to_vec().into(),
    };
    s_.append(&[odd], None).unwrap();
    drop(s_);
    let out = inspect(&[s(&dir), "--entries", "106"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let t = text(&out);
    assert!(t.contains("\"not a command\"  (not a command: "), "{t}");
    let v = json(&inspect(&[s(&dir), "--entries", "106", "--json"]));
    let p = &v["entries"][0]["payload"];
    assert_eq!(p["format"], "text");
    assert!(
        p["not_a_command"].as_str().unwrap().contains("version"),
        "{p}"
    );
}

#[test]
fn usage_errors_exit_1_never_the_torn_tail_code() {
    for args in [
        &["--keys"][..],
        &["--snapshot"][..],
        &["x", "--snapshot", "y"][..],
    ] {
        let out = inspect(args);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {}", text(&out));
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("error:"),
            "{}",
            text(&out)
        );
    }
    let out = inspect(&["--help"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(
        help.contains("--snapshot <FILE>") && help.contains("--keys"),
        "{help}"
    );
}

/// A backup (`raftkv snapshot save`'s file: the snapshot inside an envelope with the cluster
/// id) is verified and listed like a snapshot, with offsets in the backup file.
#[test]
fn a_backup_is_verified_listed_and_located() {
    use raftkv_storage::snapshot::backup::BackupWriter;
    use raftkv_storage::vfs::StdFs;
    let (tmp, _older, newer) = build_data_dir();
    let backup = tmp.path().join("backup.rkv");
    let mut w =
        BackupWriter::create(std::sync::Arc::new(StdFs), &backup, "prod", 1234, 1 << 30).unwrap();
    w.write(&std::fs::read(&newer).unwrap()).unwrap();
    let saved = w.finish().unwrap();
    let base = saved.header.snapshot_offset();

    let out = inspect(&["--snapshot", s(&backup), "--verify"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.starts_with(&format!("backup {}: ok", backup.display())),
        "{stdout}"
    );
    assert!(stdout.contains("cluster \"prod\""), "{stdout}");
    let v = json(&inspect(&["--snapshot", s(&backup), "--json"]));
    assert_eq!(
        (v["index"].as_u64(), v["term"].as_u64()),
        (Some(100), Some(2))
    );
    assert_eq!(v["backup"]["cluster_id"], "prod");
    assert_eq!(v["backup"]["snapshot_offset"], base);
    let v = json(&inspect(&["--snapshot", s(&backup), "--keys", "--json"]));
    assert_eq!(v["keys_read"], model_upto(100).len());

    // Damage in the third chunk is named at that chunk's offset in the backup file.
    let chunk = chunk_offsets(&newer)[2];
    flip_byte(&backup, base + chunk + 20);
    let out = inspect(&["--snapshot", s(&backup), "--verify"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("CORRUPT BACKUP"), "{stdout}");
    assert!(
        stdout.contains(&format!("byte offset:     {}", base + chunk))
            && stdout.contains("chunk 2 CRC mismatch"),
        "{stdout}"
    );
}
