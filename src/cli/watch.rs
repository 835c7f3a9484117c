//! `raftkv watch KEY [--prefix] [--rev R]`: prints committed changes as they come, until
//! Ctrl-C.
//!
//! Human form, one line per change: `PUT key value (rev 12)`, `DELETE key (rev 13)`
//! (progress events are not printed). `-w json`: every event as one JSON line as the server
//! sends it, progress events (`{"type":"progress","revision":R}`) included, for a script that
//! wants to know how far it is up to date. Without `--rev` the watch starts after the
//! current revision. The stream resumes on another endpoint by itself when its node goes
//! away, with no change missed or printed twice.
//!
//! Exit codes: 0 on Ctrl-C (or when stdout is closed); 1 when the start revision is older
//! than the history the nodes keep (compacted: the message says from where to start again)
//! or a node refused the watch; 3 when no node served it within the retry budget; 2 usage.

use super::kv::{client, failure, runtime, EndpointArgs, ValueFormat};
use super::UsageError;
use raftkv::api::WatchEvent;
use raftkv::client::{ClientError, WatchSpec};
use std::io::Write;
use std::process::ExitCode;

#[derive(Debug, clap::Args)]
pub struct WatchArgs {
    /// The key to watch (with --prefix: the prefix; "" watches every key).
    pub key: String,
    /// Watch every key starting with KEY.
    #[arg(long)]
    pub prefix: bool,
    /// Start at revision R (default: after the current revision).
    #[arg(long, value_name = "R", value_parser = clap::value_parser!(u64).range(1..))]
    pub rev: Option<u64>,
    /// simple: a line per change; json: every event as a JSON line (progress included).
    #[arg(short = 'w', long = "write-out", value_enum, default_value = "simple")]
    pub format: ValueFormat,
    #[command(flatten)]
    pub endpoints: EndpointArgs,
}

impl WatchArgs {
    /// What to watch, as the client takes it.
    fn spec(&self) -> Result<WatchSpec, UsageError> {
        let spec = match self.prefix {
            true => WatchSpec::prefix(&self.key),
            false if self.key.is_empty() => {
                return Err(UsageError(
                    "the key to watch must not be empty (use --prefix \"\" for every key)".into(),
                ))
            }
            false => WatchSpec::key(&self.key),
        };
        Ok(match self.rev {
            Some(rev) => spec.from_revision(rev),
            None => spec,
        })
    }
}

pub fn run(args: &WatchArgs) -> anyhow::Result<ExitCode> {
    let spec = args.spec()?;
    let c = client(&args.endpoints)?;
    runtime()?.block_on(async {
        let ctrl_c = tokio::signal::ctrl_c();
        tokio::pin!(ctrl_c);
        let mut stream = tokio::select! {
            opened = c.watch(spec) => match opened {
                Ok(stream) => stream,
                Err(e) => return Ok(watch_failed(e)),
            },
            _ = &mut ctrl_c => return Ok(ExitCode::SUCCESS),
        };
        let mut out = std::io::stdout().lock();
        loop {
            let event = tokio::select! {
                event = stream.next() => event,
                _ = &mut ctrl_c => return Ok(ExitCode::SUCCESS),
            };
            let line = match event {
                Some(Ok(event)) => render(&event, args.format)?,
                Some(Err(e)) => return Ok(watch_failed(e)),
                None => return Ok(ExitCode::SUCCESS),
            };
            // A closed stdout (`| head`) ends the watch quietly.
            if let Some(line) = line {
                if writeln!(out, "{line}").and_then(|_| out.flush()).is_err() {
                    return Ok(ExitCode::SUCCESS);
                }
            }
        }
    })
}

/// Prints why the watch ended (with where to start again after a compaction).
fn watch_failed(e: ClientError) -> ExitCode {
    if let ClientError::Compacted { compact_revision } = e {
        eprintln!(
            "raftkv: {e}; read the keys again, then watch with --rev {} or later",
            compact_revision + 1
        );
        return ExitCode::FAILURE;
    }
    failure(e)
}

/// The line printed for an event (`None`: not printed in this format).
pub fn render(event: &WatchEvent, format: ValueFormat) -> serde_json::Result<Option<String>> {
    if format == ValueFormat::Json {
        return serde_json::to_string(event).map(Some);
    }
    Ok(match event {
        WatchEvent::Put(kv) => Some(format!(
            "PUT {} {} (rev {})",
            kv.key, kv.value, kv.mod_revision
        )),
        WatchEvent::Delete(kv) => Some(format!("DELETE {} (rev {})", kv.key, kv.mod_revision)),
        WatchEvent::Progress { .. } | WatchEvent::Error { .. } => None,
    })
}

#[cfg(test)]
mod tests {
    use super::super::{Cli, Command};
    use super::*;
    use clap::Parser;
    use raftkv::api::WatchKv;
    use raftkv::client::WatchTarget;

    fn parse(args: &[&str]) -> Result<WatchArgs, clap::Error> {
        let mut argv = vec!["raftkv", "watch"];
        argv.extend_from_slice(args);
        match Cli::try_parse_from(argv)?.command {
            Command::Watch(w) => Ok(w),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn the_watch_flags_use_the_public_names() {
        let w = parse(&["config/", "--prefix", "--rev", "12", "-w", "json"]).unwrap();
        assert_eq!(w.format, ValueFormat::Json);
        let spec = w.spec().unwrap();
        assert_eq!(spec.target, WatchTarget::Prefix("config/".into()));
        assert_eq!(spec.start_revision, Some(12));
        let w = parse(&["k"]).unwrap();
        assert_eq!(w.format, ValueFormat::Simple);
        let spec = w.spec().unwrap();
        assert_eq!(
            (spec.target, spec.start_revision),
            (WatchTarget::Key("k".into()), None)
        );
        let every = parse(&["", "--prefix"]).unwrap().spec().unwrap();
        assert_eq!(every.target, WatchTarget::Prefix(String::new()));
        assert!(parse(&[""]).unwrap().spec().is_err(), "an empty key");
        for bad in [
            &[][..],
            &["k", "--rev", "0"],
            &["k", "--rev", "x"],
            &["k", "-w", "yaml"],
        ] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn events_print_as_lines() {
        let kv = WatchKv {
            key: "svc/a".into(),
            value: "10.0.0.1:80".into(),
            create_revision: 10,
            mod_revision: 12,
            version: 2,
            lease: 7,
        };
        let put = WatchEvent::Put(kv.clone());
        let delete = WatchEvent::Delete(WatchKv {
            mod_revision: 13,
            ..kv
        });
        let progress = WatchEvent::Progress { revision: 13 };
        let simple = |e| render(e, ValueFormat::Simple).unwrap();
        assert_eq!(simple(&put).unwrap(), "PUT svc/a 10.0.0.1:80 (rev 12)");
        assert_eq!(simple(&delete).unwrap(), "DELETE svc/a (rev 13)");
        assert_eq!(simple(&progress), None);
        let json = render(&progress, ValueFormat::Json).unwrap().unwrap();
        assert_eq!(json, r#"{"type":"progress","revision":13}"#);
        let json = render(&put, ValueFormat::Json).unwrap().unwrap();
        assert_eq!(serde_json::from_str::<WatchEvent>(&json).unwrap(), put);
        assert!(json.starts_with(r#"{"type":"put","key":"svc/a""#), "{json}");
    }
}
