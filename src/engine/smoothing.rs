//! Label smoothing: the per-frame top-1 labels of one stream in, the stream's retained label out.
//!
//! A classifier flickers between labels on borderline frames; publishing every flicker on the
//! retained `state` topic would make it useless for automation. [`Smoother`] is a plain struct
//! (no clock, no I/O: times come in as seconds) that turns a sequence of score vectors into a
//! sequence of smoothed labels, by one of three methods (see [`SmoothingMethod`]) followed by a
//! dwell time that a new label must hold before the state changes.

use std::collections::VecDeque;

use crate::config::{SmoothingMethod, SmoothingSettings};

/// What [`Smoother::push`] decided for one frame.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Smoothed {
    /// The stream's label after this frame; `None` while no label is confident enough (ema
    /// only) or before the first label held for `min_dwell_s`.
    pub label: Option<usize>,
    /// `label` differs from the one before this frame.
    pub changed: bool,
    /// When `label` took over, in the caller's seconds.
    pub since: f64,
}

/// The smoothing state of one stream.
#[derive(Debug, Clone)]
pub struct Smoother {
    settings: SmoothingSettings,
    /// majority: top-1 label of the last `window` frames, oldest first.
    recent: VecDeque<usize>,
    /// ema: the running average of each label's score.
    averages: Vec<f64>,
    /// The published label and when it took over.
    current: Option<usize>,
    since: f64,
    /// A different label the method proposes, and since when, while it serves its dwell time.
    pending: Option<(Option<usize>, f64)>,
}

impl Smoother {
    /// A smoother with the same settings and no history.
    pub fn fresh(&self) -> Smoother {
        Smoother::new(self.settings.clone())
    }

    /// A smoother for valid settings (see `Settings::validate`).
    pub fn new(settings: SmoothingSettings) -> Smoother {
        Smoother {
            recent: VecDeque::with_capacity(settings.window),
            settings,
            averages: Vec::new(),
            current: None,
            since: 0.0,
            pending: None,
        }
    }

    /// The current smoothed label.
    pub fn label(&self) -> Option<usize> {
        self.current
    }

    /// One frame's scores (one per label), captured at `at` seconds.
    pub fn push(&mut self, scores: &[f32], at: f64) -> Smoothed {
        let proposed = match self.settings.method {
            SmoothingMethod::None => argmax(scores),
            SmoothingMethod::Majority => self.majority(scores),
            SmoothingMethod::Ema => self.ema(scores),
        };
        let changed = self.dwell(proposed, at);
        Smoothed { label: self.current, changed, since: self.since }
    }

    /// Applies `min_dwell_s` to the method's proposal; true when the label changed.
    fn dwell(&mut self, proposed: Option<usize>, at: f64) -> bool {
        if proposed == self.current {
            self.pending = None;
            return false;
        }
        let started = match self.pending {
            Some((label, since)) if label == proposed => since,
            _ => at,
        };
        if at - started >= self.settings.min_dwell_s {
            self.current = proposed;
            self.since = started;
            self.pending = None;
            true
        } else {
            self.pending = Some((proposed, started));
            false
        }
    }

    /// The most frequent top-1 label of the window. A tie keeps the current label when it is
    /// among the tied, else goes to the tied label seen most recently.
    fn majority(&mut self, scores: &[f32]) -> Option<usize> {
        let top = argmax(scores)?;
        if self.recent.len() == self.settings.window {
            self.recent.pop_front();
        }
        self.recent.push_back(top);
        let count = |label: usize| self.recent.iter().filter(|&&seen| seen == label).count();
        let best = self.recent.iter().map(|&label| count(label)).max().unwrap_or(0);
        if let Some(current) = self.current
            && count(current) == best
        {
            return Some(current);
        }
        self.recent.iter().rev().copied().find(|&label| count(label) == best)
    }

    /// Hysteresis on the running averages: another label takes over once its average reaches
    /// `enter` and beats the current one; the current label is given up (no label) when its
    /// average falls below `leave` and no other label qualifies.
    fn ema(&mut self, scores: &[f32]) -> Option<usize> {
        let alpha = self.settings.alpha;
        if self.averages.len() != scores.len() {
            self.averages = scores.iter().map(|&score| f64::from(score)).collect();
        } else {
            for (average, &score) in self.averages.iter_mut().zip(scores) {
                *average = alpha * f64::from(score) + (1.0 - alpha) * *average;
            }
        }
        let current = self.current.and_then(|label| self.averages.get(label).map(|&a| (label, a)));
        let challenger = self
            .averages
            .iter()
            .enumerate()
            .filter(|&(label, &average)| {
                Some(label) != self.current && average >= self.settings.enter
            })
            .max_by(|a, b| a.1.total_cmp(b.1).then(b.0.cmp(&a.0)));
        match (current, challenger) {
            (Some((_, held)), Some((label, &average))) if average > held => Some(label),
            (None, Some((label, _))) => Some(label),
            (Some((label, held)), _) if held >= self.settings.leave => Some(label),
            _ => None,
        }
    }
}

/// Index of the best score (the first of equal ones); `None` for no scores.
fn argmax(scores: &[f32]) -> Option<usize> {
    scores
        .iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1).then(b.0.cmp(&a.0)))
        .map(|(index, _)| index)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(method: SmoothingMethod) -> SmoothingSettings {
        SmoothingSettings { method, ..SmoothingSettings::default() }
    }

    /// Scores where `label` (of 3) has `score` and the rest share what is left.
    fn one(label: usize, score: f32) -> Vec<f32> {
        let mut scores = vec![(1.0 - score) / 2.0; 3];
        scores[label] = score;
        scores
    }

    /// Pushes the frames one second apart; returns the smoothed label after each.
    fn run(smoother: &mut Smoother, frames: &[Vec<f32>]) -> Vec<Option<usize>> {
        frames.iter().enumerate().map(|(t, scores)| smoother.push(scores, t as f64).label).collect()
    }

    #[test]
    fn none_follows_every_frame() {
        let mut smoother = Smoother::new(settings(SmoothingMethod::None));
        let frames = [one(0, 0.9), one(1, 0.5), one(1, 0.9), one(0, 0.4)];
        assert_eq!(run(&mut smoother, &frames), [Some(0), Some(1), Some(1), Some(0)]);
    }

    #[test]
    fn majority_ignores_a_single_flicker() {
        let mut smoother =
            Smoother::new(SmoothingSettings { window: 3, ..settings(SmoothingMethod::Majority) });
        let labels = [0, 0, 1, 0, 1, 1, 1];
        let frames: Vec<Vec<f32>> = labels.iter().map(|&label| one(label, 0.8)).collect();
        let out = run(&mut smoother, &frames);
        // Window [0] [0,0] [0,0,1] [0,1,0] [1,0,1] [0,1,1] [1,1,1].
        assert_eq!(out, [Some(0), Some(0), Some(0), Some(0), Some(1), Some(1), Some(1)]);
    }

    #[test]
    fn majority_ties_keep_the_current_label() {
        let mut smoother =
            Smoother::new(SmoothingSettings { window: 2, ..settings(SmoothingMethod::Majority) });
        let frames = [one(2, 0.9), one(1, 0.9), one(1, 0.9)];
        assert_eq!(run(&mut smoother, &frames), [Some(2), Some(2), Some(1)]);
    }

    #[test]
    fn ema_needs_enter_to_take_over_and_leave_to_let_go() {
        let mut smoother = Smoother::new(SmoothingSettings {
            alpha: 0.5,
            enter: 0.6,
            leave: 0.3,
            ..settings(SmoothingMethod::Ema)
        });
        // 0.9 at once → label 0. Then label 1 frames: label 0's average falls
        // (0.9 → 0.49 → 0.28), label 1's rises (0.05 → 0.45 → 0.65): at 0.45 it is not in yet.
        let frames = [one(0, 0.9), one(1, 0.85), one(1, 0.85), one(1, 0.85)];
        let out = run(&mut smoother, &frames);
        assert_eq!(out, [Some(0), Some(0), Some(1), Some(1)]);
    }

    #[test]
    fn ema_gives_up_a_fading_label_when_nothing_else_is_confident() {
        let mut smoother = Smoother::new(SmoothingSettings {
            alpha: 1.0,
            enter: 0.7,
            leave: 0.4,
            ..settings(SmoothingMethod::Ema)
        });
        let frames = [one(0, 0.35), one(0, 0.8), one(0, 0.5), one(1, 0.5), one(1, 0.75)];
        let out = run(&mut smoother, &frames);
        // Nothing reaches enter at first; 0.5 stays above leave; then label 0 falls to 0.25.
        assert_eq!(out, [None, Some(0), Some(0), None, Some(1)]);
    }

    #[test]
    fn min_dwell_holds_back_a_new_label() {
        let mut smoother = Smoother::new(SmoothingSettings {
            min_dwell_s: 2.0,
            ..settings(SmoothingMethod::None)
        });
        // t = 0..6; label 1 appears at t = 1 for one frame, then from t = 3 on.
        let labels = [0, 1, 0, 1, 1, 1, 1];
        let frames: Vec<Vec<f32>> = labels.iter().map(|&label| one(label, 0.9)).collect();
        let pushed: Vec<Smoothed> =
            frames.iter().enumerate().map(|(t, s)| smoother.push(s, t as f64)).collect();
        let out: Vec<Option<usize>> = pushed.iter().map(|s| s.label).collect();
        // The first label waits its dwell too (t = 0 → 2).
        assert_eq!(out, [None, None, None, None, None, Some(1), Some(1)]);
        assert!(pushed[5].changed && !pushed[6].changed);
        assert_eq!(pushed[5].since, 3.0, "since is when the label first appeared");
    }

    #[test]
    fn changes_are_reported_once() {
        let mut smoother = Smoother::new(settings(SmoothingMethod::None));
        let changed: Vec<bool> = [one(0, 0.9), one(0, 0.9), one(2, 0.9)]
            .iter()
            .enumerate()
            .map(|(t, scores)| smoother.push(scores, t as f64).changed)
            .collect();
        assert_eq!(changed, [true, false, true]);
    }
}
