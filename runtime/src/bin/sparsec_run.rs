//! `sparsec-run`: executes a compiled artifact on the CPU or an NVIDIA GPU,
//! optionally checking it against the reference interpreter and the CPU.
//! Links no LLVM: this is what runs on the GPU machine.

use anyhow::{Context, Result};
use clap::{Parser, ValueEnum};
use ndarray::ArrayD;
use sparsec_runtime::compare::Tolerance;
use sparsec_runtime::execute::{compare_all, reference_outputs, DeviceKind, Executor};
use sparsec_runtime::{Artifact, Trust};
use std::path::PathBuf;

#[derive(Clone, Copy, Debug, PartialEq, ValueEnum)]
enum DeviceArg {
    Cpu,
    Cuda,
}

/// Run a sparsec artifact.
#[derive(Parser)]
#[command(version, about)]
struct Args {
    /// Artifact directory written by `sparsec compile`.
    artifact: PathBuf,
    /// Where to run.
    #[arg(long, value_enum, default_value = "cpu")]
    device: DeviceArg,
    /// Sequence length bound to `seq` for random inputs.
    #[arg(long, default_value_t = 4)]
    seq: u64,
    /// Seed of the random (standard normal) inputs.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Also run the reference interpreter and compare (exit 1 on mismatch).
    #[arg(long)]
    check: bool,
    /// With --device cuda: also run on the CPU and compare.
    #[arg(long)]
    compare_cpu: bool,
    /// Absolute tolerance of comparisons.
    #[arg(long, default_value_t = 1e-4)]
    atol: f32,
    /// Relative tolerance of comparisons.
    #[arg(long, default_value_t = 1e-4)]
    rtol: f32,
    /// Timed runs after one warm-up (median reported).
    #[arg(long, default_value_t = 1)]
    repeat: usize,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
    /// Skip hashing the artifact's files at load (the structure is still
    /// validated): for an artifact this machine just built.
    #[arg(long)]
    trust: bool,
}

fn summary(a: &ArrayD<f32>) -> serde_json::Value {
    let head: Vec<f32> = a.iter().take(6).copied().collect();
    serde_json::json!({ "shape": a.shape(), "head": head, "sum": a.iter().map(|v| *v as f64).sum::<f64>() })
}

fn main() {
    // Like other Unix tools, end quietly when the reader of stdout goes away
    // (`| head`) instead of failing on a broken pipe.
    // SAFETY: restoring the default disposition of SIGPIPE at start-up, before any threads.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    if let Err(e) = real_main() {
        eprintln!("sparsec-run: error: {e:#}");
        std::process::exit(2);
    }
}

fn real_main() -> Result<()> {
    let args = Args::parse();
    let trust = if args.trust { Trust::SkipFileHashes } else { Trust::Verify };
    let art = Artifact::open_with(&args.artifact, trust).with_context(|| format!("opening {}", args.artifact.display()))?;
    let inputs = art.random_inputs(args.seq, args.seed)?;
    let tol = Tolerance { atol: args.atol, rtol: args.rtol };
    let mut report = serde_json::json!({ "artifact": args.artifact, "graph": art.manifest.graph_name, "seq": args.seq });
    let device = match args.device {
        DeviceArg::Cpu => DeviceKind::Cpu,
        DeviceArg::Cuda => DeviceKind::Cuda,
    };
    let exec = Executor::load(&art, device)?;
    let device_name = exec.device_name();
    let (outputs, run_ms) = exec.run_timed(&art, &inputs, args.repeat)?;
    report["device"] = device_name.clone().into();
    report["run_ms_median"] = run_ms.into();
    report["outputs"] = outputs.iter().map(summary).collect::<Vec<_>>().into();
    let mut ok = true;
    let mut check = |label: &str, want: &[ArrayD<f32>], report: &mut serde_json::Value| {
        let (passed, cmps) = compare_all(&outputs, want, tol);
        ok &= passed;
        report[label] = serde_json::json!({ "passed": passed, "tolerance": tol, "outputs": cmps });
    };
    if args.check {
        let reference = reference_outputs(&art, &inputs)?;
        check("check_reference", &reference, &mut report);
    }
    if args.compare_cpu && args.device == DeviceArg::Cuda {
        let cpu = Executor::load(&art, DeviceKind::Cpu)?.run(&art, &inputs)?;
        check("check_cpu", &cpu, &mut report);
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "graph {} on {device_name}, seq = {}: {:.3} ms (median of {})",
            art.manifest.graph_name,
            args.seq,
            run_ms,
            args.repeat.max(1)
        );
        for (i, o) in outputs.iter().enumerate() {
            let s = summary(o);
            println!("  output {i}: shape {} head {} sum {}", s["shape"], s["head"], s["sum"]);
        }
        for label in ["check_reference", "check_cpu"] {
            if let Some(c) = report.get(label) {
                let worst = c["outputs"]
                    .as_array()
                    .map(|v| v.iter().filter_map(|o| o["max_abs_error"].as_f64()).fold(0.0, f64::max))
                    .unwrap_or(f64::NAN);
                println!(
                    "  {label}: {} (max abs error {worst:.3e}, atol {} rtol {})",
                    if c["passed"] == true { "PASS" } else { "FAIL" },
                    tol.atol,
                    tol.rtol
                );
            }
        }
    }
    if !ok {
        std::process::exit(1);
    }
    Ok(())
}
