//! `wal-inspect`: read, verify and dump a raftkv node's write-ahead log, without changing it.
//!
//! Three modes over one read-only scan (the scan `Wal::open` runs, so the tool reports exactly
//! what opening would do):
//! - `wal-inspect DIR`: a summary of segments, hard state, snapshot markers and damage.
//! - `wal-inspect DIR --entries [RANGE]`: one line per live entry.
//! - `wal-inspect DIR --verify`: every CRC, index continuity and term order.
//!
//! Every mode takes `--json` and exits with the verdict: 0 clean, 1 corrupt (or any error:
//! missing directory, unreadable file, bad arguments), 2 only a torn tail.

mod entries;
mod payload;
mod summary;
mod verdict;

use anyhow::{bail, Context};
use clap::Parser;
use entries::{EntriesJson, EntryListing, IndexRange};
use raftkv_storage::vfs::StdFs;
use raftkv_storage::wal::scan::{Scan, ScanOptions};
use raftkv_storage::wal::{parse_segment_name, scan_dir, WalOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use verdict::{Verdict, VerifyReport};

/// Read, verify and dump a raftkv write-ahead log without changing it.
///
/// Exit status: 0 clean; 1 corruption (opening would refuse) or an error; 2 only a torn tail
/// (opening would cut it off).
#[derive(Debug, Parser)]
#[command(name = "wal-inspect", version)]
struct Args {
    /// A node's data directory (its `wal/` subdirectory is read) or a `wal/` directory.
    dir: PathBuf,

    /// List live entries, optionally in a range: N, FROM..TO (TO excluded), FROM..=TO,
    /// FROM.., ..TO.
    #[arg(
        long,
        value_name = "RANGE",
        num_args = 0..=1,
        default_missing_value = "..",
        conflicts_with = "verify"
    )]
    entries: Option<IndexRange>,

    /// Check every record and report the first problem: file, byte offset and index.
    #[arg(long)]
    verify: bool,

    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,

    /// The largest record payload accepted, as configured for the node's WAL.
    #[arg(long, value_name = "BYTES", default_value_t = WalOptions::default().record_bytes_max)]
    record_bytes_max: u64,
}

/// `DIR/wal` if it is a directory, else `DIR`.
fn wal_dir(dir: &Path) -> PathBuf {
    let nested = dir.join("wal");
    if nested.is_dir() {
        nested
    } else {
        dir.to_path_buf()
    }
}

fn scan(args: &Args) -> anyhow::Result<Scan> {
    let dir = wal_dir(&args.dir);
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
        bail!(
            "no WAL segment files (<seq>-<first-index>.wal) in {}",
            dir.display()
        );
    }
    Ok(scan)
}

fn run(args: &Args, out: &mut dyn Write) -> anyhow::Result<Verdict> {
    let scan = scan(args)?;
    let verdict = Verdict::of(&scan);
    if args.verify {
        let report = VerifyReport::new(&scan);
        if args.json {
            serde_json::to_writer_pretty(&mut *out, &report)?;
            writeln!(out)?;
        } else {
            out.write_all(report.render_text().as_bytes())?;
        }
    } else if let Some(range) = args.entries {
        let decoder = payload::RawPayload::default();
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
            serde_json::to_writer_pretty(&mut *out, &json)?;
            writeln!(out)?;
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
    } else {
        let summary = summary::Summary::new(&scan, args.record_bytes_max);
        if args.json {
            serde_json::to_writer_pretty(&mut *out, &summary)?;
            writeln!(out)?;
        } else {
            out.write_all(summary.render_text().as_bytes())?;
        }
    }
    out.flush()?;
    Ok(verdict)
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
    let args = Args::parse();
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
