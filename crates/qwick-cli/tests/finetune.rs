//! `qwick finetune` as users run it: a toy chat task is learned (held-out loss falls near zero
//! and `run --lora` answers as taught), an interrupted run resumes to the same adapter as an
//! uninterrupted one, adapters come out in PEFT's layout (a committed adapter written by qwick
//! gives PEFT's logits, `tests/finetune/qwick_adapter*`, checked by
//! `python/check_peft_adapter.py`), `--bench` reports speed and memory, and bad input is
//! refused with the line or setting at fault.

mod common;

use common::{greedy_model, ok, qwick, root, scratch};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};

fn fails(args: &[&str], needle: &str) {
    let o = qwick(args);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "qwick {} succeeded", args.join(" "));
    assert!(!err.contains("panicked"), "{err}");
    assert!(err.contains(needle), "expected {needle:?} in: {err}");
}

const ANSWER: &str = "I am qwick, a small helper.";

/// A chat JSONL file: varied questions, one fixed answer.
fn toy_data(path: &Path, n: usize) {
    let qs = ["Who are you?", "What is your name?", "Introduce yourself.", "Tell me about you.", "Hello, who is this?"];
    let names = ["Ada", "Bob", "Cy", "Dee", "Eve", "Fay", "Gus"];
    let lines: Vec<String> = (0..n)
        .map(|i| {
            let q = format!("{} I am {}.", qs[i % qs.len()], names[(i * 3) % names.len()]);
            json!({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": ANSWER}]}).to_string()
        })
        .collect();
    std::fs::write(path, lines.join("\n") + "\n").unwrap();
}

fn train_args<'a>(data: &'a str, out: &'a str) -> Vec<&'a str> {
    vec![
        "finetune",
        "--model",
        greedy_model("finetune"),
        "--data",
        data,
        "--out",
        out,
        "--rank",
        "8",
        "--lr",
        "1e-2",
        "--seq-len",
        "256",
        "--threads",
        "2",
    ]
}

#[test]
fn a_toy_task_is_learned_and_served() {
    let d = scratch("finetune", "toy");
    let data = d.join("toy.jsonl");
    toy_data(&data, 40);
    let out = d.join("adapter");
    let mut args = train_args(data.to_str().unwrap(), out.to_str().unwrap());
    args.extend(["--epochs", "12", "--eval-split", "0.1", "--json"]);
    let j: Value = serde_json::from_str(ok(&args).trim()).unwrap();
    assert_eq!(j["finished"], true);
    // Untrained, the next-token loss is about ln(vocab) ≈ 12; the task is one fixed sentence.
    let eval = j["eval_loss"].as_f64().unwrap();
    assert!(eval < 0.1, "held-out loss {eval}");
    for f in ["adapter_config.json", "adapter_model.safetensors", "training_log.json"] {
        assert!(out.join(f).exists(), "{f} missing");
    }
    let cfg: Value = serde_json::from_str(&std::fs::read_to_string(out.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(
        (cfg["peft_type"].as_str(), cfg["r"].as_u64(), cfg["task_type"].as_str()),
        (Some("LORA"), Some(8), Some("CAUSAL_LM"))
    );
    let said = |lora: Option<&Path>| {
        let mut a =
            vec!["run", "--model", greedy_model("finetune"), "--prompt", "Who are you? I am Zed.", "--no-think"];
        a.extend(["--temperature", "0", "--max-tokens", "10", "--threads", "1"]);
        if let Some(l) = lora {
            a.extend(["--lora", l.to_str().unwrap()]);
        }
        ok(&a)
    };
    assert_eq!(said(Some(&out)).trim(), ANSWER);
    assert_ne!(said(None).trim(), ANSWER);
}

/// The tensors of an adapter's safetensors file.
fn tensors(dir: &Path) -> Vec<(String, Vec<f32>)> {
    let c = qwick_model::safetensors::Checkpoint::open_file(&dir.join("adapter_model.safetensors")).unwrap();
    let mut names: Vec<String> = c.names().map(str::to_string).collect();
    names.sort();
    names.into_iter().map(|n| (n.clone(), c.tensor(&n).unwrap().to_f32())).collect()
}

#[test]
fn an_interrupted_run_resumes_to_the_same_adapter() {
    let d = scratch("finetune", "resume");
    let data = d.join("toy.jsonl");
    toy_data(&data, 30);
    let (straight, resumed) = (d.join("straight"), d.join("resumed"));
    let steps = ["--max-steps", "40", "--save-every", "0", "--dropout", "0.1", "--warmup-steps", "5"];
    let mut a = train_args(data.to_str().unwrap(), straight.to_str().unwrap());
    a.extend(steps);
    ok(&a);
    // The same run, stopped by Ctrl-C (SIGINT) after a few steps, then resumed.
    let mut a = train_args(data.to_str().unwrap(), resumed.to_str().unwrap());
    a.extend(steps);
    let mut child = Command::new(env!("CARGO_BIN_EXE_qwick")).args(&a).stderr(Stdio::piped()).spawn().unwrap();
    let mut err = String::new();
    for line in BufReader::new(child.stderr.take().unwrap()).lines() {
        let line = line.unwrap();
        if line.starts_with("step 3/") {
            Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap();
        }
        err += &line;
        err.push('\n');
    }
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(130), "{err}");
    assert!(err.contains("interrupted after step"), "{err}");
    assert!(!resumed.join("adapter_model.safetensors").exists(), "no final adapter before the end");
    let ckpt: Vec<String> = std::fs::read_dir(&resumed)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("checkpoint-"))
        .collect();
    assert_eq!(ckpt.len(), 1, "{ckpt:?}");
    // Without --resume the folder is not reused.
    fails(&a, "--resume");
    a.push("--resume");
    ok(&a);
    let (x, y) = (tensors(&straight), tensors(&resumed));
    assert_eq!(x.len(), y.len());
    for ((n, a), (_, b)) in x.iter().zip(&y) {
        let d = qwick_backend::check::worst_abs(b, a);
        assert!(d.err <= 1e-6, "{n}: resumed differs by {d}");
    }
    // A checkpoint of other settings is refused.
    let mut other = train_args(data.to_str().unwrap(), resumed.to_str().unwrap());
    other.extend(["--max-steps", "40", "--resume", "--alpha", "64"]);
    fails(&other, "differs from this run's");
}

#[test]
fn adapters_written_by_qwick_are_what_peft_loads() {
    let d = scratch("finetune", "peft");
    let fixture = root().join("tests/finetune/qwick_adapter");
    // PEFT's logits for the committed adapter (python/check_peft_adapter.py), last position.
    let (_, want) = qwick_model::npy::read_f32(&root().join("tests/finetune/qwick_adapter_peft_logits.npy")).unwrap();
    let toks = "151644,872,198,15191,525,498,30,151645,198,151644,77091,198";
    let out = d.join("l.npy");
    ok(&[
        "logits",
        "--model",
        greedy_model("finetune"),
        "--lora",
        fixture.to_str().unwrap(),
        "--tokens",
        toks,
        "--out",
        out.to_str().unwrap(),
    ]);
    let (shape, got) = qwick_model::npy::read_f32(&out).unwrap();
    let last = &got[(shape[0] - 1) * shape[1]..];
    let err = qwick_backend::check::worst_abs(last, &want);
    assert!(err.err < 1e-3, "logits differ from PEFT's by {err}");
    // qwick's writer reproduces that adapter byte for byte.
    let model = qwick_model::Qwen3::load(Path::new(greedy_model("finetune"))).unwrap();
    let adapter = qwick_model::lora::Adapter::open(&fixture).unwrap();
    let params = qwick_train::lora::LoraParams::from_adapter(&model.config, &adapter, 0.0).unwrap();
    let again = d.join("again");
    params.save(&again, Some("tests/greedy/model".into())).unwrap();
    assert_eq!(
        std::fs::read(again.join("adapter_model.safetensors")).unwrap(),
        std::fs::read(fixture.join("adapter_model.safetensors")).unwrap()
    );
    let cfg = |p: &Path| -> Value {
        serde_json::from_str(&std::fs::read_to_string(p.join("adapter_config.json")).unwrap()).unwrap()
    };
    assert_eq!(cfg(&again), cfg(&fixture));
}

#[test]
fn bench_reports_speed_and_memory() {
    let j: Value = serde_json::from_str(
        ok(&[
            "finetune",
            "--model",
            greedy_model("finetune"),
            "--bench",
            "--seq-len",
            "64",
            "--bench-steps",
            "1",
            "--threads",
            "1",
            "--json",
        ])
        .trim(),
    )
    .unwrap();
    assert!(j["train_tok_s"].as_f64().unwrap() > 0.0 && j["peak_rss_bytes"].as_u64().unwrap() > 0, "{j}");
}

#[test]
fn bad_input_is_refused_with_what_is_wrong() {
    let d = scratch("finetune", "bad");
    let data = d.join("mixed.jsonl");
    toy_data(&data, 6);
    let mut text = std::fs::read_to_string(&data).unwrap();
    text += "{not json\n{\"messages\": [{\"role\": \"wizard\", \"content\": \"hi\"}]}\n{\"prompt\": \"x\"}\n";
    std::fs::write(&data, text).unwrap();
    let out = d.join("out");
    let (ds, os) = (data.to_str().unwrap(), out.to_str().unwrap());
    let base = train_args(ds, os);
    fails(&base, "3 malformed line(s)");
    fails(&base, "mixed.jsonl:7: invalid JSON");
    fails(&base, "mixed.jsonl:8: unknown role \"wizard\"");
    fails(&base, "mixed.jsonl:9: needs \"messages\"");
    assert!(!out.exists(), "nothing written before training starts");
    let mut skip = base.clone();
    skip.extend(["--skip-bad", "--max-steps", "2", "--eval-split", "0"]);
    ok(&skip);
    assert!(out.join("adapter_model.safetensors").exists());
    let mut t = base.clone();
    t.extend(["--targets", "q,zz"]);
    fails(&t, "unknown LoRA target \"zz\"");
    // An adapter of another model.
    let other = root().join("tests/lora/adapter_r8");
    let mut l = skip.clone();
    l.extend(["--lora", other.to_str().unwrap()]);
    fails(&l, "does it belong to this model?");
    fails(&["finetune", "--model", greedy_model("finetune"), "--data", ds], "--out");
}
