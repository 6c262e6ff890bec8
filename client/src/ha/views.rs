//! What each tracker told us, and the one topology merged from it.
//!
//! Rules (each has a test below):
//! - Per broker, the report with the highest version wins, whichever tracker brought it: a
//!   stale report from one tracker never overrides a fresher one from another.
//! - A broker is gone when no tracker that counts still lists it.
//! - Trackers that count: the connected ones, as soon as one of them is ready. When none is
//!   (every tracker down, or just restarted), every view ever received counts: the cache
//!   keeps the client working and nothing is forgotten on the word of a tracker that is
//!   still collecting reports.
//! - A snapshot from a tracker that is not ready adds to what that tracker said before
//!   instead of replacing it; its first ready snapshot replaces it.

use std::collections::HashMap;

use crate::topology::{NodeState, Topology, TopologyUpdate};

/// A change numbered out of sequence: the caller must ask the tracker for a snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Gap {
    pub expected: u64,
    pub got: u64,
}

#[derive(Debug, Default)]
struct View {
    /// A subscription is open and its snapshot arrived.
    connected: bool,
    /// The tracker's last snapshot or change said it was ready.
    ready: bool,
    /// Sequence number of the last update applied.
    seq: u64,
    brokers: HashMap<String, NodeState>,
}

/// The views of every configured tracker, by index.
#[derive(Debug)]
pub(crate) struct Views {
    views: Vec<View>,
}

impl Views {
    pub fn new(trackers: usize) -> Views {
        Views {
            views: (0..trackers).map(|_| View::default()).collect(),
        }
    }

    /// Applies what tracker `index` sent.
    pub fn apply(&mut self, index: usize, update: TopologyUpdate) -> Result<(), Gap> {
        let Some(view) = self.views.get_mut(index) else {
            return Ok(());
        };
        if update.full {
            if update.ready {
                view.brokers.clear();
            }
            view.connected = true;
        } else if update.seq != view.seq + 1 {
            return Err(Gap {
                expected: view.seq + 1,
                got: update.seq,
            });
        }
        view.ready = update.ready;
        view.seq = update.seq;
        for id in update.removed {
            view.brokers.remove(&id);
        }
        for broker in update.brokers {
            keep_newest(&mut view.brokers, broker);
        }
        Ok(())
    }

    /// Tracker `index` went away; its view stays as a cache.
    pub fn disconnected(&mut self, index: usize) {
        if let Some(view) = self.views.get_mut(index) {
            view.connected = false;
        }
    }

    /// True once any tracker sent a snapshot.
    pub fn any_snapshot(&self) -> bool {
        self.views
            .iter()
            .any(|v| v.connected || !v.brokers.is_empty())
    }

    /// True when a connected tracker is ready.
    pub fn any_ready(&self) -> bool {
        self.views.iter().any(|v| v.connected && v.ready)
    }

    /// Connected trackers, by index.
    pub fn connected(&self) -> Vec<bool> {
        self.views.iter().map(|v| v.connected).collect()
    }

    /// The merged topology (see the module rules).
    pub fn merged(&self) -> Topology {
        let live_only = self.any_ready();
        let mut merged = HashMap::new();
        for view in self.views.iter().filter(|v| v.connected || !live_only) {
            for broker in view.brokers.values() {
                keep_newest(&mut merged, broker.clone());
            }
        }
        Topology::new(merged.into_values())
    }
}

fn keep_newest(brokers: &mut HashMap<String, NodeState>, broker: NodeState) {
    match brokers.get(&broker.id) {
        Some(known) if known.version() > broker.version() => {}
        _ => {
            brokers.insert(broker.id.clone(), broker);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn broker(id: &str, epoch: u64, seq: u64) -> NodeState {
        NodeState {
            id: id.into(),
            addr: id.into(),
            epoch,
            seq,
            ..NodeState::default()
        }
    }

    fn snapshot(seq: u64, ready: bool, brokers: Vec<NodeState>) -> TopologyUpdate {
        TopologyUpdate {
            seq,
            ready,
            full: true,
            brokers,
            removed: vec![],
        }
    }

    fn change(seq: u64, brokers: Vec<NodeState>, removed: &[&str]) -> TopologyUpdate {
        TopologyUpdate {
            seq,
            ready: true,
            ..change_while_warming(seq, brokers, removed)
        }
    }

    fn change_while_warming(seq: u64, brokers: Vec<NodeState>, removed: &[&str]) -> TopologyUpdate {
        TopologyUpdate {
            seq,
            ready: false,
            full: false,
            brokers,
            removed: removed.iter().map(|s| s.to_string()).collect(),
        }
    }

    fn ids(views: &Views) -> Vec<String> {
        views.merged().brokers().map(|b| b.id.clone()).collect()
    }

    #[test]
    fn newest_report_wins_whichever_tracker_has_it() {
        let mut views = Views::new(2);
        views
            .apply(0, snapshot(5, true, vec![broker("a", 1, 9)]))
            .unwrap();
        views
            .apply(1, snapshot(7, true, vec![broker("a", 1, 4)]))
            .unwrap();
        assert_eq!(views.merged().broker("a").unwrap().seq, 9);
        // A restart (new epoch) beats any sequence number of the old process.
        views
            .apply(1, change(8, vec![broker("a", 2, 1)], &[]))
            .unwrap();
        assert_eq!(views.merged().broker("a").unwrap().version().epoch, 2);
    }

    #[test]
    fn broker_is_gone_only_when_no_tracker_has_it() {
        let mut views = Views::new(2);
        views
            .apply(
                0,
                snapshot(1, true, vec![broker("a", 1, 1), broker("b", 1, 1)]),
            )
            .unwrap();
        views
            .apply(1, snapshot(1, true, vec![broker("a", 1, 1)]))
            .unwrap();
        assert_eq!(ids(&views), ["a", "b"], "b is seen by one tracker only");
        views.apply(0, change(2, vec![], &["a"])).unwrap();
        assert_eq!(ids(&views), ["a", "b"]);
        views.apply(1, change(2, vec![], &["a"])).unwrap();
        assert_eq!(ids(&views), ["b"]);
    }

    #[test]
    fn gaps_are_reported() {
        let mut views = Views::new(1);
        views.apply(0, snapshot(3, true, vec![])).unwrap();
        assert_eq!(
            views.apply(0, change(5, vec![], &[])),
            Err(Gap {
                expected: 4,
                got: 5
            })
        );
    }

    #[test]
    fn cache_survives_every_tracker_down_but_a_dead_trackers_view_does_not_linger() {
        let mut views = Views::new(2);
        views
            .apply(0, snapshot(1, true, vec![broker("a", 1, 1)]))
            .unwrap();
        views
            .apply(1, snapshot(1, true, vec![broker("a", 1, 1)]))
            .unwrap();
        views.disconnected(0);
        views.disconnected(1);
        assert_eq!(ids(&views), ["a"], "cached while every tracker is down");
        // Tracker 1 comes back and says a is gone: tracker 0's stale view does not count.
        views.apply(1, snapshot(9, true, vec![])).unwrap();
        assert!(ids(&views).is_empty());
    }

    #[test]
    fn a_restarted_tracker_does_not_make_us_forget_live_brokers() {
        let mut views = Views::new(1);
        views
            .apply(
                0,
                snapshot(4, true, vec![broker("a", 1, 1), broker("b", 1, 1)]),
            )
            .unwrap();
        views.disconnected(0);
        // Restarted empty, still collecting reports: nothing is forgotten.
        views.apply(0, snapshot(1, false, vec![])).unwrap();
        assert_eq!(ids(&views), ["a", "b"]);
        views
            .apply(0, change_while_warming(2, vec![broker("a", 1, 2)], &[]))
            .unwrap();
        assert_eq!(views.merged().broker("a").unwrap().seq, 2);
        assert_eq!(ids(&views), ["a", "b"]);
        // Ready: its word is now complete, and b (which never reported again) is gone.
        views
            .apply(0, snapshot(3, true, vec![broker("a", 1, 2)]))
            .unwrap();
        assert_eq!(ids(&views), ["a"]);
    }
}
