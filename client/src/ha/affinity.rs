//! Key affinity: the broker a keyed message goes to, by rendezvous (highest random weight)
//! hashing, a form of consistent hashing.
//!
//! Every broker holding the MQ gets a score for the key; the highest wins. While that broker
//! lives, the key stays on it (so per-key order holds). When it goes, only its keys move,
//! each to its own runner-up, and they come back when it returns. A broker joining takes
//! about `1/n` of the keys. The hash is fixed (FNV-1a with a 64-bit finaliser) so every
//! client process, of any version, makes the same choice.

use crate::topology::Candidate;

/// The index of the broker `key` belongs to among `candidates` (not empty).
pub(crate) fn owner(key: &str, candidates: &[Candidate]) -> usize {
    let key_hash = fnv1a(FNV_OFFSET, key.as_bytes());
    let mut best = (0, 0u64);
    for (i, candidate) in candidates.iter().enumerate() {
        let score = mix(fnv1a(key_hash, candidate.id.as_bytes()));
        if i == 0 || score > best.1 {
            best = (i, score);
        }
    }
    best.0
}

/// Indexes of `candidates` from the one `key` belongs to down to its last choice.
pub(crate) fn ranked(key: &str, candidates: &[Candidate]) -> Vec<usize> {
    let key_hash = fnv1a(FNV_OFFSET, key.as_bytes());
    let mut scored: Vec<(u64, usize)> = candidates
        .iter()
        .enumerate()
        .map(|(i, c)| (mix(fnv1a(key_hash, c.id.as_bytes())), i))
        .collect();
    scored.sort_unstable_by(|a, b| b.cmp(a));
    scored.into_iter().map(|(_, i)| i).collect()
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

fn fnv1a(mut hash: u64, bytes: &[u8]) -> u64 {
    for &b in bytes {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash
}

/// The splitmix64 finaliser: FNV alone leaves similar ids with similar scores.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn brokers(ids: &[&str]) -> Vec<Candidate> {
        ids.iter()
            .map(|id| Candidate {
                id: (*id).into(),
                addr: (*id).into(),
                depth: 0,
                lag: 0,
                in_flight: 0,
            })
            .collect()
    }

    fn owners(keys: &[String], candidates: &[Candidate]) -> Vec<String> {
        keys.iter()
            .map(|k| candidates[owner(k, candidates)].id.to_string())
            .collect()
    }

    #[test]
    fn keys_spread_and_only_the_lost_brokers_keys_move() {
        let keys: Vec<String> = (0..3000).map(|i| format!("customer-{i}")).collect();
        let three = brokers(&["10.0.0.1:15555", "10.0.0.2:15555", "10.0.0.3:15555"]);
        let before = owners(&keys, &three);
        for b in &three {
            let share = before.iter().filter(|o| **o == *b.id).count();
            assert!(
                (800..1200).contains(&share),
                "{} owns {share} of 3000",
                b.id
            );
        }
        let two: Vec<Candidate> = three
            .iter()
            .filter(|c| &*c.id != "10.0.0.2:15555")
            .cloned()
            .collect();
        let after = owners(&keys, &two);
        for (b, a) in before.iter().zip(&after) {
            if b != "10.0.0.2:15555" {
                assert_eq!(a, b, "a key of a live broker moved");
            }
        }
        // Order of the candidates does not matter.
        let mut reversed = three.clone();
        reversed.reverse();
        assert_eq!(owners(&keys, &reversed), before);
    }

    #[test]
    fn the_choice_is_stable_across_processes_and_versions() {
        // Pinned: changing the hash would move every key of every user at upgrade time.
        let three = brokers(&["a:1", "b:1", "c:1"]);
        let keys: Vec<String> = (1..=6).map(|i| format!("k{i}")).collect();
        assert_eq!(
            owners(&keys, &three),
            ["c:1", "a:1", "c:1", "a:1", "a:1", "c:1"]
        );
        for key in &keys {
            assert_eq!(owner(key, &three), ranked(key, &three)[0]);
        }
    }
}
