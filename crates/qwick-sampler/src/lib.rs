#![warn(missing_docs)]
//! Token sampling for qwick: sampling parameters and their validation, a seeded sampler
//! (penalties, temperature, top-k, top-p, min-p), logprobs and a streaming stop-string matcher.
//!
//! The order of operations follows vLLM and transformers: repetition/frequency/presence penalties,
//! then temperature, top-k, top-p and min-p, then a draw from what is left. A temperature of zero
//! (below `1e-5`, as in vLLM) means greedy decoding: the arg-max after penalties, ties going to the
//! lowest token id.

mod constraint;
mod params;
mod rng;
mod sampler;
mod stop;

pub use constraint::{mask_logits, TokenConstraint};
pub use params::{SamplingError, SamplingParams};
pub use rng::Rng;
pub use sampler::{apply_penalties, logprobs, Sampler, TokenLogprobs};
pub use stop::{partial_match_len, StopMatch, StopMatcher};
