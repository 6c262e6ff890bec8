//! Which brokers follow a broker's copy of an MQ: rendezvous (highest random weight)
//! hashing over the live brokers of the trackers' topology. Every broker computes the same
//! answer from the same topology without asking anyone, a copy's followers spread over the
//! brokers, and a broker joining or leaving moves only the copies whose followers it was
//! (or becomes).

/// The `replicas - 1` brokers of `live` (not `leader` itself) that follow `leader`'s copy
/// of `mq`, best first. Fewer when fewer brokers are live.
pub fn followers<'a>(leader: &str, mq: &str, replicas: u32, live: &[&'a str]) -> Vec<&'a str> {
    let wanted = replicas.saturating_sub(1) as usize;
    let mut ranked: Vec<(u64, &'a str)> = live
        .iter()
        .filter(|&&broker| broker != leader)
        .map(|&broker| (weight(leader, mq, broker), broker))
        .collect();
    // Ties (never seen in practice with 64-bit weights) are broken by id, so that every
    // broker still ranks alike.
    ranked.sort_unstable_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(b.1)));
    ranked.dedup_by(|a, b| a.1 == b.1);
    ranked.into_iter().take(wanted).map(|(_, b)| b).collect()
}

/// A stable 64-bit weight of (`leader`, `mq`, `candidate`): FNV-1a, then the SplitMix64
/// finaliser so that ids differing in one character get unrelated weights. Stable across
/// builds and platforms (unlike the standard library's hasher), which placement needs.
fn weight(leader: &str, mq: &str, candidate: &str) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for part in [leader, mq, candidate] {
        // The separator keeps ("ab", "c") apart from ("a", "bc").
        for &byte in part.as_bytes().iter().chain(&[0xff]) {
            hash ^= u64::from(byte);
            hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    hash = (hash ^ (hash >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    hash = (hash ^ (hash >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    hash ^ (hash >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn brokers(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("10.0.0.{i}:15555")).collect()
    }

    #[test]
    fn a_copy_is_followed_by_replicas_minus_one_others() {
        let all = brokers(5);
        let live: Vec<&str> = all.iter().map(String::as_str).collect();
        for replicas in 0..=6 {
            let chosen = followers(live[0], "orders", replicas, &live);
            assert_eq!(chosen.len(), (replicas.saturating_sub(1) as usize).min(4));
            assert!(!chosen.contains(&live[0]), "a leader never follows itself");
        }
        // The same answer whatever order the topology lists the brokers in.
        let mut reversed = live.clone();
        reversed.reverse();
        assert_eq!(
            followers(live[0], "orders", 3, &live),
            followers(live[0], "orders", 3, &reversed)
        );
    }

    #[test]
    fn followers_spread_and_move_only_when_theirs_leaves() {
        let all = brokers(4);
        let live: Vec<&str> = all.iter().map(String::as_str).collect();
        let mut load = std::collections::HashMap::<&str, usize>::new();
        let mqs: Vec<String> = (0..400).map(|i| format!("mq-{i}")).collect();
        for mq in &mqs {
            for leader in &live {
                for f in followers(leader, mq, 2, &live) {
                    *load.entry(f).or_default() += 1;
                }
            }
        }
        // 1600 copies over 4 brokers: each follows roughly a quarter.
        for broker in &live {
            let n = load[broker];
            assert!((300..500).contains(&n), "{broker} follows {n} copies");
        }
        // Removing a broker moves only the copies it followed.
        let gone = live[3];
        let fewer: Vec<&str> = live[..3].to_vec();
        for mq in &mqs {
            let before = followers(live[0], mq, 2, &live);
            let after = followers(live[0], mq, 2, &fewer);
            if before != [gone] {
                assert_eq!(before, after, "{mq} moved though its follower stayed");
            }
        }
    }
}
