//! `wal-inspect`: read, verify and dump a raftkv node's write-ahead log and snapshot files,
//! without changing anything.
//!
//! WAL modes, over one read-only scan (the scan `Wal::open` runs, so the tool reports exactly
//! what opening would do):
//! - `wal-inspect DIR`: a summary of segments, hard state, snapshot markers and damage, then
//!   the snapshot files (each verified) when DIR is a data dir with a `snap/`.
//! - `wal-inspect DIR --entries [RANGE]`: one line per live entry, `Normal` entries decoded as
//!   client commands (`put KEY (N bytes)`, `del KEY`).
//! - `wal-inspect DIR --verify`: every CRC, index continuity and term order, and every
//!   snapshot file.
//!
//! Snapshot modes, over the storage crate's own snapshot reader (never `SnapshotStore`, which
//! creates directories and removes temp files):
//! - `--snapshots DIR` names the snapshot directory (or a data dir holding `snap/`); with no
//!   positional DIR the summary or `--verify` covers snapshots only.
//! - `--snapshot FILE`: one file verified and described; with `--keys [PREFIX]` its pairs in
//!   key order, streamed. FILE may also be a backup (`raftkv snapshot save`), with its
//!   envelope (cluster id, CRC chain) checked too.
//!
//! Every mode takes `--json` and exits with the verdict: 0 clean, 1 corrupt (a damaged WAL or
//! snapshot file, or any error: missing directory, unreadable file, bad arguments), 2 only a
//! torn tail in the WAL.

mod entries;
mod keys;
mod payload;
mod reader;
mod snapshots;
mod summary;
mod verdict;

use anyhow::{bail, Context};
use clap::Parser;
use entries::{EntriesJson, EntryListing, IndexRange};
use raftkv_storage::snapshot::SNAP_DIR_NAME;
use raftkv_storage::vfs::StdFs;
use raftkv_storage::wal::scan::{Scan, ScanOptions};
use raftkv_storage::wal::{parse_segment_name, scan_dir, WalOptions};
use snapshots::{SnapshotFileView, SnapshotsReport};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use verdict::{Verdict, VerifyReport};

/// Read, verify and dump a raftkv write-ahead log and snapshot files without changing them.
///
/// DIR may be a node's data dir (its `wal/` is read, and its `snap/` too when there is one)
/// or a `wal/` directory.
///
/// Examples:
///   wal-inspect data/                      summary of the WAL and the snapshot files
///   wal-inspect data/ --verify             check every record and every snapshot file
///   wal-inspect data/ --entries 100..200   entries with their decoded commands
///   wal-inspect --snapshots data/snap      snapshot files only
///   wal-inspect --snapshot data/snap/F.snap --keys user/   keys of one snapshot
///   wal-inspect --snapshot backup.rkv --verify   check a backup (raftkv snapshot save)
///
/// Exit status: 0 clean; 1 corruption (opening the WAL would refuse, or a snapshot file does
/// not verify) or an error; 2 only a torn tail (opening would cut it off).
#[derive(Debug, Parser)]
#[command(name = "wal-inspect", version, verbatim_doc_comment)]
struct Args {
    /// A node's data directory (its `wal/` subdirectory is read, and `snap/` if present) or a
    /// `wal/` directory.
    #[arg(required_unless_present_any = ["snapshots", "snapshot"])]
    dir: Option<PathBuf>,

    /// List live entries, optionally in a range: N, FROM..TO (TO excluded), FROM..=TO,
    /// FROM.., ..TO. Normal entries are decoded as client commands.
    #[arg(
        long,
        value_name = "RANGE",
        num_args = 0..=1,
        default_missing_value = "..",
        conflicts_with_all = ["verify", "snapshots"],
        requires = "dir"
    )]
    entries: Option<IndexRange>,

    /// Check every record and every snapshot file; report the first WAL problem (file, byte
    /// offset, index) and every damaged snapshot (file, byte offset, reason).
    #[arg(long)]
    verify: bool,

    /// The snapshot directory (or a data dir holding `snap/`) to list and verify; by default
    /// DIR's `snap/` when it has one.
    #[arg(long, value_name = "DIR")]
    snapshots: Option<PathBuf>,

    /// One snapshot file or backup (`raftkv snapshot save`): verify and describe it (and list
    /// its keys with --keys).
    #[arg(
        long,
        value_name = "FILE",
        conflicts_with_all = ["dir", "entries", "snapshots"]
    )]
    snapshot: Option<PathBuf>,

    /// With --snapshot: list its keys in order, with value sizes (and values when short
    /// text), only those starting with PREFIX if given. The whole file is still verified.
    #[arg(
        long,
        value_name = "PREFIX",
        num_args = 0..=1,
        default_missing_value = "",
        requires = "snapshot"
    )]
    keys: Option<String>,

    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,

    /// The largest record payload accepted, as configured for the node's WAL.
    #[arg(long, value_name = "BYTES", default_value_t = WalOptions::default().record_bytes_max)]
    record_bytes_max: u64,
}

/// `DIR/<sub>` if it is a directory, else `DIR`.
fn nested_or_self(dir: &Path, sub: &str) -> PathBuf {
    let nested = dir.join(sub);
    if nested.is_dir() {
        nested
    } else {
        dir.to_path_buf()
    }
}

fn scan(dir: &Path, args: &Args) -> anyhow::Result<Scan> {
    let dir = nested_or_self(dir, "wal");
    if !dir.is_dir() {
        bail!("{} is not a directory", dir.display());
    }
    let opts = ScanOptions {
        record_bytes_max: args.record_bytes_max,
    };
    let scan = scan_dir(&StdFs, &dir, opts)
        .with_context(|| format!("cannot read the WAL in {}", dir.display()))?;
    let has_segments = !scan.segments.is_empty()
        || scan
            .unscanned
            .iter()
            .any(|n| parse_segment_name(n).is_some());
    if !has_segments {
        let hint = if dir.join(SNAP_DIR_NAME).is_dir()
            || std::fs::read_dir(&dir).is_ok_and(|mut d| {
                d.any(|e| e.is_ok_and(|e| e.file_name().to_string_lossy().ends_with(".snap")))
            }) {
            " (for snapshot files only, use --snapshots DIR)"
        } else {
            ""
        };
        bail!(
            "no WAL segment files (<seq>-<first-index>.wal) in {}{hint}",
            dir.display()
        );
    }
    Ok(scan)
}

/// The snapshot directory to report on: `--snapshots` (which must exist), else DIR's `snap/`
/// if it has one.
fn snapshot_dir(args: &Args) -> anyhow::Result<Option<PathBuf>> {
    if let Some(dir) = &args.snapshots {
        let dir = nested_or_self(dir, SNAP_DIR_NAME);
        if !dir.is_dir() {
            bail!("{} is not a directory", dir.display());
        }
        return Ok(Some(dir));
    }
    Ok(args
        .dir
        .as_ref()
        .map(|d| d.join(SNAP_DIR_NAME))
        .filter(|d| d.is_dir()))
}

fn write_json(out: &mut dyn Write, value: &impl serde::Serialize) -> anyhow::Result<()> {
    serde_json::to_writer_pretty(&mut *out, value)?;
    writeln!(out)?;
    Ok(())
}

fn run(args: &Args, out: &mut dyn Write) -> anyhow::Result<Verdict> {
    let verdict = run_mode(args, out)?;
    out.flush()?;
    Ok(verdict)
}

fn run_mode(args: &Args, out: &mut dyn Write) -> anyhow::Result<Verdict> {
    if let Some(file) = &args.snapshot {
        if let Some(prefix) = &args.keys {
            return keys::dump(file, prefix.as_bytes(), args.json, out);
        }
        if !file.is_file() {
            bail!("{} is not a file", file.display());
        }
        let view = SnapshotFileView::check(file);
        if args.json {
            write_json(out, &view)?;
        } else {
            out.write_all(view.render_text().as_bytes())?;
        }
        return Ok(view.verdict());
    }
    let Some(dir) = &args.dir else {
        // Snapshots only (`--snapshots DIR` without a WAL).
        let Some(snap_dir) = snapshot_dir(args)? else {
            bail!("nothing to inspect: give DIR, --snapshots DIR or --snapshot FILE");
        };
        let report = SnapshotsReport::new(&snap_dir)?;
        if args.json {
            write_json(out, &report)?;
        } else {
            out.write_all(report.render_text(args.verify).as_bytes())?;
        }
        return Ok(report.verdict);
    };
    let scan = scan(dir, args)?;
    if let Some(range) = args.entries {
        let verdict = Verdict::of(&scan);
        let decoder = payload::CommandPayload::default();
        let listing = EntryListing::new(&scan, range, &decoder, args.record_bytes_max);
        if args.json {
            let json = EntriesJson {
                dir: scan.dir.display().to_string(),
                verdict,
                first_index: listing.lo,
                last_index: listing.hi,
                count: listing.len(),
                entries: &listing,
            };
            write_json(out, &json)?;
        } else {
            listing.write_text(out)?;
        }
        if let Some(c) = &scan.corruption {
            eprintln!(
                "wal-inspect: the WAL is corrupt at {} byte offset {}: entries after index {} are not shown",
                c.file.display(),
                c.offset,
                c.last_good_index
            );
        }
        return Ok(verdict);
    }
    let snapshots = snapshot_dir(args)?
        .map(|d| SnapshotsReport::new(&d))
        .transpose()?;
    if args.verify {
        let report = VerifyReport::new(&scan, snapshots);
        if args.json {
            write_json(out, &report)?;
        } else {
            out.write_all(report.render_text().as_bytes())?;
        }
        Ok(report.verdict)
    } else {
        let summary = summary::Summary::new(&scan, args.record_bytes_max, snapshots);
        if args.json {
            write_json(out, &summary)?;
        } else {
            out.write_all(summary.render_text().as_bytes())?;
        }
        Ok(summary.verdict)
    }
}

fn is_broken_pipe(err: &anyhow::Error) -> bool {
    err.chain().any(|cause| {
        let kind = match cause.downcast_ref::<io::Error>() {
            Some(e) => Some(e.kind()),
            None => cause
                .downcast_ref::<serde_json::Error>()
                .and_then(serde_json::Error::io_error_kind),
        };
        kind == Some(io::ErrorKind::BrokenPipe)
    })
}

fn main() -> ExitCode {
    let args = match Args::try_parse() {
        Ok(args) => args,
        Err(err) => {
            // `--help` and `--version` succeed; a usage error exits 1 like any other error,
            // never 2, which means "torn tail" to scripts.
            let code = if err.use_stderr() { 1 } else { 0 };
            // If even this cannot be printed there is nobody to tell.
            let _ = err.print();
            return ExitCode::from(code);
        }
    };
    let stdout = io::stdout();
    let mut out = io::BufWriter::new(stdout.lock());
    match run(&args, &mut out) {
        Ok(verdict) => verdict.to_exit_code(),
        // The reader went away (`| head`): not an error of the WAL.
        Err(err) if is_broken_pipe(&err) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("wal-inspect: error: {err:#}");
            ExitCode::from(1)
        }
    }
}
