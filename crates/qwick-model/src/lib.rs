//! What Qwen3 is: its configuration, its weights as checkpoints store them, and the forward
//! pass over a flat batch of token spans reading and writing a paged KV cache.

pub mod batch;
pub mod config;
pub mod exec;
pub mod gguf;
#[cfg(feature = "gpu")]
pub mod gpu;
pub mod kv;
pub mod linear;
pub mod lora;
pub mod names;
pub mod npy;
pub mod qwen3;
pub mod random;
pub mod safetensors;
pub mod weights;

pub use batch::Batch;
pub use config::{Architecture, Config};
pub use kv::{KvCache, KV_FORMATS};
pub use qwen3::Qwen3;
pub use weights::{LoadOptions, ModelFiles};
