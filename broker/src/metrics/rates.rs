//! Per-second message rates of every MQ over the last two minutes, for the monitor page's
//! charts and rate columns. A task samples the MQ counters once a second, so a page opened
//! now shows the recent past at once instead of starting from an empty chart.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use super::traffic::MqTraffic;

/// Seconds of history kept per MQ.
pub const RATE_HISTORY: usize = 120;

/// The sampled totals of every MQ. One lock for all, taken once a second by the sampler and
/// once per stats request, so every MQ's history lines up with the same sample count.
#[derive(Debug, Default)]
pub struct RateHistory {
    book: Mutex<Book>,
}

#[derive(Debug, Default)]
struct Book {
    /// Samples taken since the start.
    samples: u64,
    /// Per MQ, the (messages in, messages out) totals at the last `RATE_HISTORY + 1`
    /// samples, oldest first.
    totals: HashMap<String, VecDeque<(u64, u64)>>,
}

/// Recent per-second rates, newest last.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Rates {
    /// Messages in during each second.
    pub messages_in: Vec<u64>,
    /// Messages out during each second.
    pub messages_out: Vec<u64>,
}

impl RateHistory {
    /// Records one sample of every MQ's totals; MQs not listed are forgotten.
    pub fn sample(&self, now: impl IntoIterator<Item = (String, MqTraffic)>) {
        let mut book = self.book.lock().expect("rate history poisoned");
        let mut seen = HashMap::with_capacity(book.totals.len());
        for (name, traffic) in now {
            let mut history = book.totals.remove(&name).unwrap_or_default();
            if history.len() > RATE_HISTORY {
                history.pop_front();
            }
            history.push_back((traffic.messages_in, traffic.messages_out));
            seen.insert(name, history);
        }
        book.totals = seen;
        book.samples += 1;
    }

    /// The sample count, and the last `seconds` rates of each MQ (fewer for young MQs).
    pub fn recent(&self, seconds: usize) -> (u64, HashMap<String, Rates>) {
        let book = self.book.lock().expect("rate history poisoned");
        let rates = book
            .totals
            .iter()
            .map(|(name, history)| {
                let skip = history.len().saturating_sub(seconds.saturating_add(1));
                let diffs: Vec<(u64, u64)> = history
                    .iter()
                    .skip(skip)
                    .collect::<Vec<_>>()
                    .windows(2)
                    .map(|w| (w[1].0.saturating_sub(w[0].0), w[1].1.saturating_sub(w[0].1)))
                    .collect();
                let rates = Rates {
                    messages_in: diffs.iter().map(|d| d.0).collect(),
                    messages_out: diffs.iter().map(|d| d.1).collect(),
                };
                (name.clone(), rates)
            })
            .collect();
        (book.samples, rates)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn traffic(messages_in: u64, messages_out: u64) -> MqTraffic {
        MqTraffic {
            messages_in,
            messages_out,
            ..MqTraffic::default()
        }
    }

    #[test]
    fn rates_are_differences_between_samples() {
        let h = RateHistory::default();
        h.sample([("a".to_owned(), traffic(0, 0))]);
        h.sample([("a".to_owned(), traffic(10, 4))]);
        h.sample([
            ("a".to_owned(), traffic(15, 14)),
            ("b".to_owned(), traffic(7, 0)),
        ]);
        let (samples, rates) = h.recent(10);
        assert_eq!(samples, 3);
        assert_eq!(rates["a"].messages_in, vec![10, 5]);
        assert_eq!(rates["a"].messages_out, vec![4, 10]);
        assert!(
            rates["b"].messages_in.is_empty(),
            "one sample is no rate yet"
        );
        assert_eq!(h.recent(1).1["a"].messages_in, vec![5]);
    }

    #[test]
    fn history_is_bounded_and_removed_mqs_are_forgotten() {
        let h = RateHistory::default();
        for i in 0..(RATE_HISTORY as u64 + 50) {
            h.sample([("a".to_owned(), traffic(i, 0))]);
        }
        assert_eq!(h.recent(usize::MAX).1["a"].messages_in.len(), RATE_HISTORY);
        h.sample(Vec::new());
        assert!(h.recent(10).1.is_empty());
    }
}
