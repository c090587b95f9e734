//! A small client of a node's object store for shells, tests and benchmarks: put a generated
//! object, get one and report where it was mapped, or hold pins until killed. Prints one JSON
//! line per action on stdout.

use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Parser, Subcommand};
use object_store::StoreClient;
use protocol::ObjectId;

#[derive(Parser)]
#[command(about = "Talk to a node's object store over its Unix socket")]
struct Args {
    /// The store's socket.
    #[arg(long)]
    socket: std::path::PathBuf,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Put `size` bytes of deterministic pseudo-random data generated from `seed`.
    Put {
        #[arg(long)]
        id: ObjectId,
        #[arg(long)]
        size: u64,
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
    /// Get objects; report checksum, length and where the bytes sit in this process.
    Get {
        #[arg(long, required = true)]
        id: Vec<ObjectId>,
        #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
        timeout: Duration,
    },
    /// Pin objects (get), create one unsealed object, report, then wait to be killed.
    Hold {
        #[arg(long)]
        id: Vec<ObjectId>,
        /// Also create this object and never seal it.
        #[arg(long)]
        unsealed: Option<ObjectId>,
        #[arg(long, default_value_t = 4096)]
        unsealed_size: u64,
    },
}

/// Fills `buf` from a xorshift generator: fast enough for GiB-sized test objects.
fn fill(buf: &mut [u8], seed: u64) {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut chunks = buf.chunks_exact_mut(8);
    for c in &mut chunks {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        c.copy_from_slice(&x.to_le_bytes());
    }
    for b in chunks.into_remainder() {
        *b = x as u8;
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let client = StoreClient::connect(&args.socket)?;
    let map = client.mapping();
    match args.cmd {
        Cmd::Put { id, size, seed } => {
            let t = Instant::now();
            let mut w = client.create(id, size, 0)?;
            fill(w.data_mut(), seed);
            let crc = crc32fast::hash(w.data_mut());
            w.seal()?;
            println!(
                "{}",
                serde_json::json!({ "id": id.to_string(), "crc": crc, "size": size, "secs": t.elapsed().as_secs_f64() })
            );
        }
        Cmd::Get { id, timeout } => {
            let views = client.get(&id, Some(timeout))?;
            for (id, v) in id.iter().zip(views) {
                let v =
                    v.with_context(|| format!("object {id} not available after {timeout:?}"))?;
                let data = v.data();
                println!(
                    "{}",
                    serde_json::json!({
                        "id": id.to_string(),
                        "crc": crc32fast::hash(data),
                        "len": data.len(),
                        "addr": data.as_ptr() as usize,
                        "map_start": map.start,
                        "map_end": map.end,
                    })
                );
            }
        }
        Cmd::Hold {
            id,
            unsealed,
            unsealed_size,
        } => {
            let views = client.get(&id, Some(Duration::from_secs(30)))?;
            anyhow::ensure!(
                views.iter().all(Option::is_some),
                "not every object is available"
            );
            let writer = unsealed
                .map(|u| client.create(u, unsealed_size, 0))
                .transpose()?;
            println!(
                "{}",
                serde_json::json!({ "holding": views.len(), "unsealed": writer.is_some() })
            );
            loop {
                std::thread::sleep(Duration::from_secs(3600));
            }
        }
    }
    Ok(())
}
