/// Length in bytes of the longest suffix of `text` that is a proper prefix of `pattern`
/// (always a whole number of characters): text that must be held back while streaming because
/// the next delta could complete `pattern`.
pub fn partial_match_len(text: &str, pattern: &str) -> usize {
    let max = text.len().min(pattern.len().saturating_sub(1));
    (1..=max)
        .rev()
        .find(|&n| {
            let start = text.len() - n;
            text.is_char_boundary(start) && pattern.as_bytes().starts_with(&text.as_bytes()[start..])
        })
        .unwrap_or(0)
}

/// What [`StopMatcher::push`] returns.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StopMatch {
    /// Text that is safe to emit now (never part of a stop string).
    pub text: String,
    /// Index (into the matcher's stop strings) of the stop string that ended generation, if one did.
    pub stop: Option<usize>,
}

/// Finds stop strings in streamed text, across delta boundaries.
///
/// Text that could be the beginning of a stop string is held back until it is known not to be;
/// the stop string itself and anything after it are never emitted. When several stop strings
/// match, the one starting earliest wins (ties: the one listed first).
#[derive(Debug, Clone, Default)]
pub struct StopMatcher {
    stops: Vec<String>,
    held: String,
    stopped: Option<usize>,
}

impl StopMatcher {
    /// A matcher for `stops`; empty strings are ignored.
    pub fn new<I, S>(stops: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Self { stops: stops.into_iter().map(Into::into).filter(|s| !s.is_empty()).collect(), ..Self::default() }
    }

    /// The stop strings this matcher looks for.
    pub fn stops(&self) -> &[String] {
        &self.stops
    }

    /// Whether a stop string has been found; later pushes return nothing.
    pub fn is_stopped(&self) -> bool {
        self.stopped.is_some()
    }

    /// Text held back because it could start a stop string.
    pub fn held(&self) -> &str {
        &self.held
    }

    /// Feeds the next piece of generated text.
    pub fn push(&mut self, delta: &str) -> StopMatch {
        if self.stopped.is_some() {
            return StopMatch::default();
        }
        self.held.push_str(delta);
        let found =
            self.stops.iter().enumerate().filter_map(|(i, s)| self.held.find(s.as_str()).map(|pos| (pos, i))).min();
        if let Some((pos, i)) = found {
            self.held.truncate(pos);
            self.stopped = Some(i);
            return StopMatch { text: std::mem::take(&mut self.held), stop: Some(i) };
        }
        let keep = self.stops.iter().map(|s| partial_match_len(&self.held, s)).max().unwrap_or(0);
        let rest = self.held.split_off(self.held.len() - keep);
        StopMatch { text: std::mem::replace(&mut self.held, rest), stop: None }
    }

    /// Ends the stream: returns the held-back text (empty after a stop).
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.held)
    }
}
