//! `rayctl`: the one binary users install. Thin: parses options, sets up tracing and the
//! metrics recorder, and calls the libraries' `start`/clients.
//!
//! Exit codes: 0 ok, 1 failed, 2 usage, 3 cluster unreachable, 4 not found, 5 job stopped.

mod autoscaler;
mod cli;
mod daemon;
mod job;
mod logs;
mod package;
mod session;
mod state;
mod status;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    // The chaos runner's fail points, in builds that have them (FAILPOINTS, read once).
    control_plane::failpoints::from_env();
    match cli::run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(exit_code_for(&e))
        }
    }
}

/// Maps an error to the documented exit code.
fn exit_code_for(e: &anyhow::Error) -> u8 {
    use protocol::RpcError;
    use protocol::client::ClientError;
    for cause in e.chain() {
        if let Some(c) = cause.downcast_ref::<ClientError>() {
            return match c {
                ClientError::Unreachable { .. } => 3,
                ClientError::Rpc(RpcError::NotFound(_)) => 4,
                ClientError::Rpc(RpcError::InvalidArgument(_)) => 2,
                ClientError::Rpc(_) => 1,
            };
        }
        if let Some(l) = cause.downcast_ref::<control_plane::logs::LogError>() {
            use control_plane::logs::LogError;
            return match l {
                LogError::NotFound(_) => 4,
                LogError::BadRequest(_) => 2,
                LogError::Unavailable(_) => 3,
            };
        }
        if cause.downcast_ref::<session::NoCluster>().is_some() {
            return 3;
        }
    }
    1
}
