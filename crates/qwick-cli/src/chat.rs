//! `qwick chat`: an interactive conversation. Lines from stdin are user turns (a terminal or a
//! pipe); `/think`, `/no_think`, `/clear`, `/exit` are commands. Earlier answers are kept with
//! their reasoning apart (`reasoning_content`), so the template leaves old thinking out.
//! Ctrl-C stops the answer being generated and keeps the session; at the prompt, a second
//! Ctrl-C exits.

use crate::run::{
    budget, finish_reason, generate_text, load_weights, open_chat, render, stats_line, Display, GenArgs, TextStream,
};
use anyhow::Result;
use qwick_chat::{ChatMessage, ChatModel};
use qwick_engine::Scheduler;
use std::io::{BufRead, IsTerminal, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// Most tokens the KV cache of a chat session holds (less if the model's context is shorter).
/// Its memory is touched only as the conversation grows.
pub const CHAT_CONTEXT: usize = 32768;

const HELP: &str = "commands: /think (thinking on), /no_think (thinking off), /clear (forget the conversation), \
                    /exit; Ctrl-C stops an answer";

#[derive(clap::Args)]
pub struct ChatArgs {
    #[command(flatten)]
    gen: GenArgs,
}

/// What Ctrl-C does depends on where the session is.
#[derive(Default)]
struct Signals {
    generating: AtomicBool,
    interrupted: AtomicBool,
    armed: AtomicBool,
}

fn install_handler(s: &Arc<Signals>, interactive: bool) {
    let s = s.clone();
    let r = ctrlc::set_handler(move || {
        if s.generating.load(Ordering::SeqCst) {
            s.interrupted.store(true, Ordering::SeqCst);
        } else if s.armed.swap(true, Ordering::SeqCst) {
            eprintln!();
            std::process::exit(130);
        } else {
            eprint!("\n(press Ctrl-C again to exit, or type /exit)\n{}", if interactive { ">>> " } else { "" });
        }
    });
    if let Err(e) = r {
        eprintln!("note: Ctrl-C will end the session ({e})");
    }
}

fn note(msg: &str) {
    if std::io::stderr().is_terminal() {
        eprintln!("\x1b[2m{msg}\x1b[0m");
    } else {
        eprintln!("{msg}");
    }
}

pub fn run(a: ChatArgs) -> Result<()> {
    let g = &a.gen;
    let (mut thinking, mut explicit) = g.thinking()?;
    let chat = open_chat(&g.model, g.chat_template.as_deref())?;
    // Check the sampling flags for both modes before loading anything big.
    g.sampling(&chat.gen_config, true)?;
    g.sampling(&chat.gen_config, false)?;
    let isa = g.run.isa()?;
    let model = load_weights(&chat, &g.run)?;
    let context = chat.context().min(CHAT_CONTEXT);
    // One scheduler for the session: each turn's prompt starts with the last one, whose blocks
    // the prefix cache keeps.
    let mut sched = g.run.scheduler(model, &chat.dir, &g.spec, context, isa)?;

    let signals = Arc::new(Signals::default());
    let interactive = std::io::stdin().is_terminal();
    install_handler(&signals, interactive);
    let display = if std::io::stdout().is_terminal() { Display::Pretty } else { Display::Raw };
    if interactive {
        note(HELP);
    }
    let mut history: Vec<ChatMessage> = g.system.iter().map(|s| ChatMessage::system(s.clone())).collect();
    let keep = history.len();
    let mut stdin = std::io::stdin().lock();
    let mut turn: u64 = 0;
    loop {
        if interactive {
            print!(">>> ");
            std::io::stdout().flush()?;
        }
        let mut line = String::new();
        if stdin.read_line(&mut line)? == 0 {
            if interactive {
                println!();
            }
            break;
        }
        signals.armed.store(false, Ordering::SeqCst);
        let line = line.trim_end_matches(['\n', '\r']);
        match line.trim() {
            "" => continue,
            "/exit" | "/quit" | "/bye" => break,
            "/think" => {
                (thinking, explicit) = (true, true);
                note("thinking on");
                continue;
            }
            "/no_think" => {
                (thinking, explicit) = (false, true);
                note("thinking off");
                continue;
            }
            "/clear" => {
                history.truncate(keep);
                note("conversation cleared");
                continue;
            }
            "/help" | "/?" => {
                note(HELP);
                continue;
            }
            cmd if cmd.starts_with('/') && !cmd.contains(char::is_whitespace) => {
                note(&format!("unknown command {cmd}; {HELP}"));
                continue;
            }
            _ => {}
        }
        history.push(ChatMessage::user(line));
        signals.interrupted.store(false, Ordering::SeqCst);
        signals.generating.store(true, Ordering::SeqCst);
        let r = answer(&chat, g, &mut sched, &history, thinking, explicit, turn, context, display, &signals);
        signals.generating.store(false, Ordering::SeqCst);
        turn += 1;
        match r {
            Ok(reply) => history.push(reply),
            Err(e) => {
                eprintln!("error: {e:#}");
                history.pop();
            }
        }
    }
    Ok(())
}

/// Generates one answer, printing it as it comes; returns the assistant message for the history.
#[allow(clippy::too_many_arguments)]
fn answer(
    chat: &ChatModel,
    g: &GenArgs,
    sched: &mut Scheduler,
    history: &[ChatMessage],
    thinking: bool,
    explicit: bool,
    turn: u64,
    context: usize,
    display: Display,
    signals: &Signals,
) -> Result<ChatMessage> {
    let prompt = render(chat, history, thinking, explicit)?;
    if prompt.ids.len() >= context {
        anyhow::bail!(
            "the conversation has {} tokens, which leaves no room in the context of {context} tokens; /clear starts over",
            prompt.ids.len()
        );
    }
    let mut sampling = g.sampling(&chat.gen_config, prompt.thinking)?;
    // Reproducible sessions with --seed, without repeating the same draws every turn.
    sampling.seed = sampling.seed.map(|s| s.wrapping_add(turn));
    let budget = match g.max_thinking_tokens {
        Some(n) if n > 0 && thinking => Some(budget(chat, n, &prompt)?),
        _ => None,
    };
    let mut text = TextStream::new(&chat.tokenizer, &sampling.stop, prompt.starts_in_thinking, display);
    let params = chat.params(sampling, context, budget);
    let gen = generate_text(sched, &prompt.ids, params, &mut text, || signals.interrupted.load(Ordering::SeqCst))?;
    println!();
    if signals.interrupted.load(Ordering::SeqCst) {
        note("(stopped)");
    } else if std::io::stderr().is_terminal() {
        note(&stats_line(&gen, finish_reason(&gen, &text)));
    }
    Ok(ChatMessage {
        role: "assistant".into(),
        content: Some(text.content.clone()),
        reasoning_content: (!text.reasoning.is_empty()).then(|| text.reasoning.clone()),
        ..ChatMessage::default()
    })
}
