//! Where a model runs: the CPU or a GPU adapter.

/// What `--device` names: the CPU, or GPU adapter `N` as `qwick devices` lists them (the first
/// by default).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceSpec {
    Cpu,
    Gpu(usize),
}

impl DeviceSpec {
    /// `cpu`, `gpu` or `gpu:N`.
    pub fn parse(s: &str) -> Result<DeviceSpec, String> {
        match s {
            "cpu" => Ok(DeviceSpec::Cpu),
            "gpu" => Ok(DeviceSpec::Gpu(0)),
            _ => match s.strip_prefix("gpu:").map(str::parse::<usize>) {
                Some(Ok(n)) => Ok(DeviceSpec::Gpu(n)),
                _ => Err(format!("unknown device {s:?}: expected cpu, gpu or gpu:N (see `qwick devices`)")),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_specs_parse() {
        assert_eq!(DeviceSpec::parse("cpu"), Ok(DeviceSpec::Cpu));
        assert_eq!(DeviceSpec::parse("gpu"), Ok(DeviceSpec::Gpu(0)));
        assert_eq!(DeviceSpec::parse("gpu:2"), Ok(DeviceSpec::Gpu(2)));
        for bad in ["", "gpu:", "gpu:x", "cuda", "gpu:-1"] {
            assert!(DeviceSpec::parse(bad).unwrap_err().contains("expected cpu, gpu or gpu:N"), "{bad}");
        }
    }
}
