//! LoRA fine-tuning of Qwen3 on the CPU: chat or text JSONL in ([`data`]), the forward and
//! backward passes over packed sequences ([`step`]), AdamW with schedules and clipping
//! ([`optim`]), and the loop with evaluation, checkpoints and resume ([`train`]); adapters
//! come out in PEFT's layout ([`lora`]).

pub mod data;
pub mod lora;
pub mod optim;
pub mod step;
pub mod train;

/// A small seeded generator (xorshift64*) for initialisation, shuffling and splits, so runs
/// with the same seed are the same.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }

    /// A uniform index below `n`.
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n.max(1) as u64) as usize
    }

    /// Shuffles `v` (Fisher–Yates).
    pub fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            v.swap(i, self.below(i + 1));
        }
    }
}
