//! Constraints on the tokens that may come next (a JSON schema, a regex, a grammar).

/// What a constraint says about the next token.
pub trait TokenConstraint: Send {
    /// The tokens allowed next, as a bitset over the vocabulary: bit `t % 32` of word `t / 32`
    /// is token `t`. Tokens past the bitset are not allowed.
    fn allowed(&mut self) -> Result<&[u32], String>;

    /// Takes the token that came (one of those allowed).
    fn consume(&mut self, token: u32) -> Result<(), String>;
}

/// Sets the logits of the tokens `allowed` excludes to -inf.
pub fn mask_logits(logits: &mut [f32], allowed: &[u32]) {
    for (t, l) in logits.iter_mut().enumerate() {
        let ok = allowed.get(t / 32).is_some_and(|w| w >> (t % 32) & 1 == 1);
        if !ok {
            *l = f32::NEG_INFINITY;
        }
    }
}
