//! The names of Qwen3's tensors in each checkpoint format, side by side. Every loader and writer
//! spells names through this table.

/// What a tensor is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    Embed,
    Head,
    FinalNorm,
    AttnNorm,
    Q,
    K,
    V,
    O,
    QNorm,
    KNorm,
    MlpNorm,
    Gate,
    Up,
    Down,
    Router,
    /// One expert's projections (GGUF stacks all experts of a layer in one 3-D tensor).
    ExpertGate,
    ExpertUp,
    ExpertDown,
}

/// (role, Hugging Face name, GGUF name); `{l}` is the layer, `{e}` the expert.
const TABLE: &[(Role, &str, &str)] = &[
    (Role::Embed, "model.embed_tokens.weight", "token_embd.weight"),
    (Role::Head, "lm_head.weight", "output.weight"),
    (Role::FinalNorm, "model.norm.weight", "output_norm.weight"),
    (Role::AttnNorm, "model.layers.{l}.input_layernorm.weight", "blk.{l}.attn_norm.weight"),
    (Role::Q, "model.layers.{l}.self_attn.q_proj.weight", "blk.{l}.attn_q.weight"),
    (Role::K, "model.layers.{l}.self_attn.k_proj.weight", "blk.{l}.attn_k.weight"),
    (Role::V, "model.layers.{l}.self_attn.v_proj.weight", "blk.{l}.attn_v.weight"),
    (Role::O, "model.layers.{l}.self_attn.o_proj.weight", "blk.{l}.attn_output.weight"),
    (Role::QNorm, "model.layers.{l}.self_attn.q_norm.weight", "blk.{l}.attn_q_norm.weight"),
    (Role::KNorm, "model.layers.{l}.self_attn.k_norm.weight", "blk.{l}.attn_k_norm.weight"),
    (Role::MlpNorm, "model.layers.{l}.post_attention_layernorm.weight", "blk.{l}.ffn_norm.weight"),
    (Role::Gate, "model.layers.{l}.mlp.gate_proj.weight", "blk.{l}.ffn_gate.weight"),
    (Role::Up, "model.layers.{l}.mlp.up_proj.weight", "blk.{l}.ffn_up.weight"),
    (Role::Down, "model.layers.{l}.mlp.down_proj.weight", "blk.{l}.ffn_down.weight"),
    (Role::Router, "model.layers.{l}.mlp.gate.weight", "blk.{l}.ffn_gate_inp.weight"),
    (Role::ExpertGate, "model.layers.{l}.mlp.experts.{e}.gate_proj.weight", "blk.{l}.ffn_gate_exps.weight"),
    (Role::ExpertUp, "model.layers.{l}.mlp.experts.{e}.up_proj.weight", "blk.{l}.ffn_up_exps.weight"),
    (Role::ExpertDown, "model.layers.{l}.mlp.experts.{e}.down_proj.weight", "blk.{l}.ffn_down_exps.weight"),
];

fn entry(role: Role) -> &'static (Role, &'static str, &'static str) {
    TABLE.iter().find(|e| e.0 == role).expect("every role is in the table")
}

fn fill(pattern: &str, layer: usize, expert: usize) -> String {
    pattern.replace("{l}", &layer.to_string()).replace("{e}", &expert.to_string())
}

/// The Hugging Face (safetensors) name of a tensor.
pub fn hf(role: Role, layer: usize, expert: usize) -> String {
    fill(entry(role).1, layer, expert)
}

/// The GGUF name of a tensor (experts share one name).
pub fn gguf(role: Role, layer: usize) -> String {
    fill(entry(role).2, layer, 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        assert_eq!(hf(Role::Q, 3, 0), "model.layers.3.self_attn.q_proj.weight");
        assert_eq!(gguf(Role::O, 11), "blk.11.attn_output.weight");
        assert_eq!(hf(Role::ExpertDown, 2, 17), "model.layers.2.mlp.experts.17.down_proj.weight");
        assert_eq!(gguf(Role::ExpertGate, 5), "blk.5.ffn_gate_exps.weight");
        assert_eq!(hf(Role::Embed, 0, 0), "model.embed_tokens.weight");
    }
}
