//! `raftkv ready`: is every given node ready to serve? One `GET /ready` per endpoint, all at
//! once, with short timeouts — the probe a container health check or a supervisor's script runs
//! where no curl is at hand (the container image holds nothing but this binary).
//!
//! One line per endpoint, in the order given. Exit 0 when every node answered 200; 3 when one
//! could not be reached (refused, or no answer within the timeout: a health check must not
//! hang), which wins over 1 when one answered anything else (not ready: no leader known,
//! behind on applying, stopping). Usage errors exit 2.

use super::kv::{client_config, runtime, EndpointArgs, EXIT_UNAVAILABLE};
use raftkv::client::{Client, ClientError};
use std::process::ExitCode;

/// The most one endpoint's answer may take.
pub const READY_REQUEST_TIMEOUT_MS: u64 = 2_000;
/// The most opening one endpoint's connection may take.
pub const READY_CONNECT_TIMEOUT_MS: u64 = 1_000;
/// Exit code: an endpoint answered, but not ready.
pub const EXIT_NOT_READY: u8 = 1;

#[derive(Debug, clap::Args)]
pub struct ReadyArgs {
    #[command(flatten)]
    pub endpoints: EndpointArgs,
}

/// What one endpoint said.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Ready,
    NotReady,
    Unreachable,
}

impl Verdict {
    fn of(answer: &Result<u64, ClientError>) -> Verdict {
        match answer {
            Ok(_) => Verdict::Ready,
            Err(ClientError::Unavailable(_)) => Verdict::Unreachable,
            Err(_) => Verdict::NotReady,
        }
    }
}

/// The exit code for the endpoints' verdicts: unreachable (3) over not ready (1) over ready (0).
pub fn exit_code(verdicts: &[Verdict]) -> u8 {
    if verdicts.contains(&Verdict::Unreachable) {
        EXIT_UNAVAILABLE
    } else if verdicts.contains(&Verdict::NotReady) {
        EXIT_NOT_READY
    } else {
        0
    }
}

/// One endpoint's line.
fn line(endpoint: &str, answer: &Result<u64, ClientError>) -> String {
    match answer {
        Ok(id) => format!("{endpoint} ready (node {id})"),
        Err(ClientError::Unavailable(e)) => {
            let why = e.strip_prefix(&format!("{endpoint}: ")).unwrap_or(e);
            format!("{endpoint} unreachable: {why}")
        }
        Err(ClientError::Rejected { status, message }) => {
            format!("{endpoint} not ready ({status}): {message}")
        }
        Err(e) => format!("{endpoint} not ready: {e}"),
    }
}

pub fn run(args: &ReadyArgs) -> anyhow::Result<ExitCode> {
    let mut config = client_config(&args.endpoints)?;
    config.request_timeout_ms = READY_REQUEST_TIMEOUT_MS;
    config.connect_timeout_ms = READY_CONNECT_TIMEOUT_MS;
    let client = Client::new(config).map_err(|e| super::UsageError(e.to_string()))?;
    let answers = runtime()?.block_on(futures_util::future::join_all(
        client
            .endpoints()
            .iter()
            .map(|e| async { (e.clone(), client.ready_of(e).await) }),
    ));
    let verdicts: Vec<Verdict> = answers.iter().map(|(_, a)| Verdict::of(a)).collect();
    for (endpoint, answer) in &answers {
        println!("{}", line(endpoint, answer));
    }
    Ok(ExitCode::from(exit_code(&verdicts)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unreachable_wins_over_not_ready_which_wins_over_ready() {
        use Verdict::*;
        assert_eq!(exit_code(&[Ready, Ready, Ready]), 0);
        assert_eq!(exit_code(&[Ready, NotReady, Ready]), 1);
        assert_eq!(exit_code(&[NotReady, Unreachable, Ready]), 3);
        assert_eq!(exit_code(&[Unreachable]), 3);
    }

    #[test]
    fn answers_map_to_verdicts_and_lines() {
        let cases: [(Result<u64, ClientError>, Verdict, &str); 4] = [
            (Ok(2), Verdict::Ready, "http://n:1 ready (node 2)"),
            (
                Err(ClientError::Rejected {
                    status: 503,
                    message: "not ready: no leader is known".into(),
                }),
                Verdict::NotReady,
                "http://n:1 not ready (503): not ready: no leader is known",
            ),
            (
                Err(ClientError::Protocol("not JSON".into())),
                Verdict::NotReady,
                "http://n:1 not ready: unexpected response: not JSON",
            ),
            (
                Err(ClientError::Unavailable("http://n:1: refused".into())),
                Verdict::Unreachable,
                "http://n:1 unreachable: refused",
            ),
        ];
        for (answer, verdict, text) in cases {
            assert_eq!(Verdict::of(&answer), verdict, "{answer:?}");
            assert_eq!(line("http://n:1", &answer), text);
        }
    }
}
