//! AdamW (decoupled weight decay, as `torch.optim.AdamW` computes it), the learning-rate
//! schedules, and clipping by the global gradient norm.

/// AdamW's settings.
#[derive(Clone, Copy, Debug)]
pub struct AdamW {
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
}

impl Default for AdamW {
    fn default() -> Self {
        AdamW { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0 }
    }
}

/// The optimizer's state for one tensor: first and second moments.
#[derive(Clone, Default)]
pub struct Moments {
    pub m: Vec<f32>,
    pub v: Vec<f32>,
}

impl Moments {
    pub fn zeros(n: usize) -> Moments {
        Moments { m: vec![0f32; n], v: vec![0f32; n] }
    }
}

impl AdamW {
    /// One update of `p` by `g` at learning rate `lr`; `step` counts from 1.
    pub fn update(&self, p: &mut [f32], g: &[f32], st: &mut Moments, lr: f32, step: u64) {
        let bc1 = 1.0 - (self.beta1 as f64).powi(step as i32);
        let bc2 = 1.0 - (self.beta2 as f64).powi(step as i32);
        let step_size = (lr as f64 / bc1) as f32;
        let bc2_sqrt = bc2.sqrt() as f32;
        let decay = 1.0 - lr * self.weight_decay;
        for i in 0..p.len() {
            p[i] *= decay;
            st.m[i] = self.beta1 * st.m[i] + (1.0 - self.beta1) * g[i];
            st.v[i] = self.beta2 * st.v[i] + (1.0 - self.beta2) * g[i] * g[i];
            let denom = st.v[i].sqrt() / bc2_sqrt + self.eps;
            p[i] -= step_size * st.m[i] / denom;
        }
    }
}

/// How the learning rate moves over training.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Schedule {
    Constant,
    Linear,
    Cosine,
}

impl Schedule {
    pub fn parse(s: &str) -> Option<Schedule> {
        match s {
            "constant" => Some(Schedule::Constant),
            "linear" => Some(Schedule::Linear),
            "cosine" => Some(Schedule::Cosine),
            _ => None,
        }
    }

    /// The learning rate of optimizer step `step` (from 0) of `total`: a linear warm-up over
    /// `warmup` steps, then constant, linear to zero or a cosine to zero (as transformers'
    /// schedulers).
    pub fn lr(self, base: f32, step: u64, warmup: u64, total: u64) -> f32 {
        if step < warmup {
            return base * step as f32 / warmup.max(1) as f32;
        }
        let rest = total.saturating_sub(warmup).max(1) as f64;
        let progress = ((step - warmup) as f64 / rest).min(1.0);
        let f = match self {
            Schedule::Constant => 1.0,
            Schedule::Linear => 1.0 - progress,
            Schedule::Cosine => 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()),
        };
        (base as f64 * f) as f32
    }
}

/// The global L2 norm of all gradients.
pub fn global_norm<'a>(grads: impl Iterator<Item = &'a [f32]>) -> f32 {
    grads.map(|g| g.iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>()).sum::<f64>().sqrt() as f32
}

/// Scales gradients so their global norm is at most `max` (as `clip_grad_norm_`); returns the
/// norm before clipping.
pub fn clip(grads: &mut [&mut [f32]], max: f32) -> f32 {
    let norm = global_norm(grads.iter().map(|g| &**g));
    let coef = max / (norm + 1e-6);
    if coef < 1.0 {
        for g in grads.iter_mut() {
            for v in g.iter_mut() {
                *v *= coef;
            }
        }
    }
    norm
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedules_warm_up_then_decay() {
        let s = Schedule::Cosine;
        assert_eq!(s.lr(1.0, 0, 10, 110), 0.0);
        assert!((s.lr(1.0, 5, 10, 110) - 0.5).abs() < 1e-6);
        assert!((s.lr(1.0, 10, 10, 110) - 1.0).abs() < 1e-6);
        assert!((s.lr(1.0, 60, 10, 110) - 0.5).abs() < 1e-6);
        assert!(s.lr(1.0, 110, 10, 110).abs() < 1e-6);
        assert!((Schedule::Linear.lr(2.0, 60, 10, 110) - 1.0).abs() < 1e-6);
        assert_eq!(Schedule::Constant.lr(2.0, 100, 0, 110), 2.0);
    }

    #[test]
    fn adamw_first_step_moves_by_lr() {
        // The first bias-corrected step is lr · g/|g| (plus decay).
        let mut p = vec![1.0f32, -2.0];
        let mut st = Moments::zeros(2);
        let opt = AdamW { weight_decay: 0.1, ..Default::default() };
        opt.update(&mut p, &[0.5, -3.0], &mut st, 0.01, 1);
        assert!((p[0] - (1.0 * (1.0 - 0.001) - 0.01)).abs() < 1e-6, "{}", p[0]);
        assert!((p[1] - (-2.0 * (1.0 - 0.001) + 0.01)).abs() < 1e-6, "{}", p[1]);
    }

    #[test]
    fn clipping_scales_to_the_norm() {
        let mut a = vec![3.0f32];
        let mut b = vec![4.0f32];
        let n = clip(&mut [a.as_mut_slice(), b.as_mut_slice()], 1.0);
        assert_eq!(n, 5.0);
        assert!((a[0] - 0.6).abs() < 1e-5 && (b[0] - 0.8).abs() < 1e-5);
    }
}
