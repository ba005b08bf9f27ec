//! How sequences share the machine: a paged KV cache managed in blocks, sequences with block
//! tables, and steps that run a mixed batch of prefill chunks and decode tokens in one
//! forward call.

pub mod blocks;
#[cfg(test)]
mod fake;
pub mod generate;
pub mod kv_manager;
pub mod runner;
pub mod scheduler;
pub mod sequence;
pub mod spec;

pub use blocks::BlockAllocator;
pub use generate::{generate, Generation, TokenEvent};
pub use kv_manager::KvManager;
pub use qwick_sampler::SamplingParams;
#[cfg(feature = "gpu")]
pub use runner::GpuForward;
pub use runner::{argmax, Logits, Qwen3Forward, Runner, RunnerConfig, SeqId, Span, StepModel};
pub use scheduler::{
    Collect, Engine, Event, EventSink, Fault, OutToken, Pooling, Request, Runners, Scheduler, SchedulerConfig,
    SchedulerStats, SubmitError,
};
pub use sequence::{Decision, FinishReason, GenParams, GenToken, SeqGen, ThinkingBudget};
pub use spec::{SpecConfig, SpecMethod};
