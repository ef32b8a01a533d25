//! The retention policy `btrship prune` applies: which moments of a share's
//! history to keep. Pure logic — moments in, one decision per moment out;
//! no I/O and no clock.
//!
//! A moment is one history object: a snapshot record (its time) or a
//! version batch (its newest entry's time, `t_last`). The policy keeps, in
//! tiers, every moment of the last day, the last moment of each hour of the
//! last week, of each day of the last three months, and so on (the
//! `[retention]` table of a share's config). Every window is measured back
//! from the newest moment, never from the wall clock: a server that was off
//! for two weeks comes back to the history it left, not to a pruned one.
//!
//! What is kept must restore exactly as before the prune. Restoring at T
//! takes the newest snapshot at or before T (the base) and the batches the
//! catalogue selects for (base, T]: `t_last > base.time && t_first <= T`.
//! So a kept moment also keeps its base and those batches (`needed-by`),
//! and, since a kept batch is itself a moment one can restore at, their
//! bases and batches in turn (the closure).

use chrono::{DateTime, Datelike};
use serde::{Deserialize, Serialize};
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::fmt;
use std::str::FromStr;

const NS_PER_SECOND: i64 = 1_000_000_000;
const NS_PER_MINUTE: i64 = 60 * NS_PER_SECOND;
const NS_PER_HOUR: i64 = 60 * NS_PER_MINUTE;
const NS_PER_DAY: i64 = 24 * NS_PER_HOUR;
const NS_PER_WEEK: i64 = 7 * NS_PER_DAY;
/// A year of retention is 365 days: windows are lengths, not dates.
const NS_PER_YEAR: i64 = 365 * NS_PER_DAY;

/// The `[retention]` table of a share's config. The values stay strings as
/// written (so a config round-trips unchanged); [`RetentionPolicy::windows`]
/// parses them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetentionPolicy {
    /// Every moment this close to the newest one.
    pub keep_all_within: String,
    /// The last moment of each hour (UTC) this close to the newest one.
    pub keep_hourly_within: String,
    /// The last moment of each day (UTC).
    pub keep_daily_within: String,
    /// The last moment of each ISO week (Monday 00:00 UTC to Sunday).
    pub keep_weekly_within: String,
    /// The last moment of each calendar month (UTC).
    pub keep_monthly_within: String,
    /// The last moment of each calendar year (UTC).
    pub keep_yearly_within: String,
}

impl Default for RetentionPolicy {
    fn default() -> Self {
        RetentionPolicy {
            keep_all_within: "24h".into(),
            keep_hourly_within: "7d".into(),
            keep_daily_within: "90d".into(),
            keep_weekly_within: "1y".into(),
            keep_monthly_within: "5y".into(),
            keep_yearly_within: "forever".into(),
        }
    }
}

/// The policy's windows in nanoseconds: `None` is forever, `Some(0)` turns
/// the tier off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Windows {
    pub all: Option<i64>,
    pub hourly: Option<i64>,
    pub daily: Option<i64>,
    pub weekly: Option<i64>,
    pub monthly: Option<i64>,
    pub yearly: Option<i64>,
}

impl RetentionPolicy {
    /// Is this the default policy, as written (so a config leaves it out)?
    pub fn is_default(&self) -> bool {
        *self == RetentionPolicy::default()
    }

    /// The parsed windows, or one message naming every bad setting.
    pub fn windows(&self) -> Result<Windows, String> {
        let settings = [
            ("keep_all_within", &self.keep_all_within),
            ("keep_hourly_within", &self.keep_hourly_within),
            ("keep_daily_within", &self.keep_daily_within),
            ("keep_weekly_within", &self.keep_weekly_within),
            ("keep_monthly_within", &self.keep_monthly_within),
            ("keep_yearly_within", &self.keep_yearly_within),
        ];
        let mut parsed = [None; 6];
        let mut problems = Vec::new();
        for (slot, (key, value)) in parsed.iter_mut().zip(settings) {
            match parse_duration(value) {
                Some(window) => *slot = window,
                None => problems.push(format!(
                    "retention.{key} = {value:?}: use a number with s, m, h, d, w or y \
                     (e.g. \"90d\"), \"0s\" to turn the tier off, or \"forever\""
                )),
            }
        }
        if !problems.is_empty() {
            return Err(problems.join("; "));
        }
        let [all, hourly, daily, weekly, monthly, yearly] = parsed;
        Ok(Windows {
            all,
            hourly,
            daily,
            weekly,
            monthly,
            yearly,
        })
    }
}

/// A retention window: `"forever"` (`Some(None)`) or one or more runs of
/// digits each followed by a unit `s`, `m`, `h`, `d`, `w` or `y` (365
/// days), like `"90d"` or `"1d12h"` (`Some(Some(ns))`; `"0s"` is zero).
/// Anything else — empty, signed, fractional, spaced, too long for `i64`
/// nanoseconds — is `None`.
pub fn parse_duration(s: &str) -> Option<Option<i64>> {
    if s == "forever" {
        return Some(None);
    }
    if s.is_empty() {
        return None;
    }
    let mut total: i64 = 0;
    let mut rest = s;
    while !rest.is_empty() {
        let digits = rest.len() - rest.trim_start_matches(|c: char| c.is_ascii_digit()).len();
        if digits == 0 {
            return None;
        }
        let count: i64 = rest[..digits].parse().ok()?;
        let unit = match rest[digits..].chars().next()? {
            's' => NS_PER_SECOND,
            'm' => NS_PER_MINUTE,
            'h' => NS_PER_HOUR,
            'd' => NS_PER_DAY,
            'w' => NS_PER_WEEK,
            'y' => NS_PER_YEAR,
            _ => return None,
        };
        total = total.checked_add(count.checked_mul(unit)?)?;
        // The unit is one ASCII byte.
        rest = &rest[digits + 1..];
    }
    Some(Some(total))
}

/// What a history object is, as far as retention cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MomentKind {
    Snapshot,
    Batch,
}

/// One history object: its place in the chain and its times (ns since the
/// Unix epoch, UTC). A snapshot has `t_first == t_last ==` its time; a
/// batch spans its oldest to its newest entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Moment {
    pub seq: u64,
    pub kind: MomentKind,
    pub t_first: i64,
    pub t_last: i64,
}

impl From<&crate::catalog::MomentRow> for Moment {
    fn from(r: &crate::catalog::MomentRow) -> Moment {
        Moment {
            seq: r.seq,
            kind: if r.snapshot {
                MomentKind::Snapshot
            } else {
                MomentKind::Batch
            },
            t_first: r.t_first,
            t_last: r.t_last,
        }
    }
}

impl Moment {
    /// The moment's time: the state it restores to is the share at `t_last`.
    pub fn time(&self) -> i64 {
        self.t_last
    }

    /// Newest first is greatest: time, then place in the chain.
    fn order_key(&self) -> (i64, u64) {
        (self.t_last, self.seq)
    }
}

/// Why a moment is kept, rendered like kopia's retention tags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// The newest moment of the history.
    Newest,
    /// Within `keep_all_within`.
    All,
    Hourly,
    Daily,
    Weekly,
    Monthly,
    Yearly,
    /// Restoring the kept moment with this seq needs it.
    NeededBy(u64),
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reason::Newest => f.write_str("newest"),
            Reason::All => f.write_str("all"),
            Reason::Hourly => f.write_str("hourly"),
            Reason::Daily => f.write_str("daily"),
            Reason::Weekly => f.write_str("weekly"),
            Reason::Monthly => f.write_str("monthly"),
            Reason::Yearly => f.write_str("yearly"),
            Reason::NeededBy(seq) => write!(f, "needed-by {seq}"),
        }
    }
}

impl FromStr for Reason {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "newest" => Reason::Newest,
            "all" => Reason::All,
            "hourly" => Reason::Hourly,
            "daily" => Reason::Daily,
            "weekly" => Reason::Weekly,
            "monthly" => Reason::Monthly,
            "yearly" => Reason::Yearly,
            _ => s
                .strip_prefix("needed-by ")
                .and_then(|seq| seq.parse().ok())
                .map(Reason::NeededBy)
                .ok_or_else(|| format!("unknown retention reason {s:?}"))?,
        })
    }
}

impl Serialize for Reason {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Reason {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = String::deserialize(deserializer)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// The verdict on one moment. `reasons` is empty exactly when `keep` is
/// false; `needed-by` appears only on moments the policy itself would not
/// keep.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Decision {
    pub seq: u64,
    pub time: i64,
    pub keep: bool,
    pub reasons: Vec<Reason>,
}

/// Decides every moment (in any order, times may repeat): one decision per
/// moment, in input order. O(n log n).
pub fn plan(windows: &Windows, moments: &[Moment]) -> Vec<Decision> {
    let mut reasons = policy_reasons(windows, moments);
    let bases = Bases::new(moments);
    let by_policy: Vec<bool> = reasons.iter().map(|r| !r.is_empty()).collect();
    let kept = close(moments, &bases, by_policy.clone());
    let policy_kept = KeptTimes::new(moments, &by_policy);
    let all_kept = KeptTimes::new(moments, &kept);
    for (i, m) in moments.iter().enumerate() {
        if kept[i] && !by_policy[i] {
            // Point at a moment the policy keeps when one needs it: that is
            // the answer to "why is this still here"; otherwise at the kept
            // moment of the closure that does.
            let (lo, hi) = needers_span(m, i, &bases);
            let needer = policy_kept
                .min_seq(lo, hi, None)
                .or_else(|| all_kept.min_seq(lo, hi, Some((m.time(), m.seq, i))));
            debug_assert!(needer.is_some(), "kept without a reason: {m:?}");
            reasons[i].extend(needer.map(Reason::NeededBy));
        }
    }
    moments
        .iter()
        .zip(reasons)
        .zip(kept)
        .map(|((m, reasons), keep)| Decision {
            seq: m.seq,
            time: m.time(),
            keep,
            reasons,
        })
        .collect()
}

/// The calendar tiers: the last moment of each bucket in the window.
#[derive(Clone, Copy)]
enum Bucket {
    Hour,
    Day,
    Week,
    Month,
    Year,
}

impl Bucket {
    /// The bucket of a time, as a number equal for equal buckets.
    fn of(self, t: i64) -> i64 {
        let at = DateTime::from_timestamp_nanos(t);
        match self {
            // Unix time has no leap seconds: UTC hours and days are fixed
            // lengths counted from the epoch.
            Bucket::Hour => t.div_euclid(NS_PER_HOUR),
            Bucket::Day => t.div_euclid(NS_PER_DAY),
            Bucket::Week => {
                let week = at.iso_week();
                i64::from(week.year()) * 100 + i64::from(week.week())
            }
            Bucket::Month => i64::from(at.year()) * 12 + i64::from(at.month0()),
            Bucket::Year => i64::from(at.year()),
        }
    }
}

/// Is a moment at `t` inside a window reaching back from `newest`?
fn in_window(window: Option<i64>, newest: i64, t: i64) -> bool {
    match window {
        None => true,
        Some(0) => false,
        Some(w) => t >= newest.saturating_sub(w),
    }
}

/// The reasons the policy itself gives each moment (before closure).
fn policy_reasons(windows: &Windows, moments: &[Moment]) -> Vec<Vec<Reason>> {
    let mut reasons = vec![Vec::new(); moments.len()];
    let Some(newest) = (0..moments.len()).max_by_key(|&i| moments[i].order_key()) else {
        return reasons;
    };
    let newest_time = moments[newest].time();
    reasons[newest].push(Reason::Newest);
    for (i, m) in moments.iter().enumerate() {
        if in_window(windows.all, newest_time, m.time()) {
            reasons[i].push(Reason::All);
        }
    }
    let tiers = [
        (Reason::Hourly, windows.hourly, Bucket::Hour),
        (Reason::Daily, windows.daily, Bucket::Day),
        (Reason::Weekly, windows.weekly, Bucket::Week),
        (Reason::Monthly, windows.monthly, Bucket::Month),
        (Reason::Yearly, windows.yearly, Bucket::Year),
    ];
    for (reason, window, bucket) in tiers {
        let mut last_of: HashMap<i64, usize> = HashMap::new();
        for (i, m) in moments.iter().enumerate() {
            if !in_window(window, newest_time, m.time()) {
                continue;
            }
            let last = last_of.entry(bucket.of(m.time())).or_insert(i);
            if m.order_key() > moments[*last].order_key() {
                *last = i;
            }
        }
        for i in last_of.into_values() {
            reasons[i].push(reason);
        }
    }
    reasons
}

/// The snapshots in time order, to find the base of any time.
struct Bases {
    /// Snapshot times, ascending (ties: by seq).
    times: Vec<i64>,
    /// The moment index of each.
    index: Vec<usize>,
}

impl Bases {
    fn new(moments: &[Moment]) -> Bases {
        let mut snapshots: Vec<usize> = (0..moments.len())
            .filter(|&i| moments[i].kind == MomentKind::Snapshot)
            .collect();
        snapshots.sort_by_key(|&i| moments[i].order_key());
        Bases {
            times: snapshots.iter().map(|&i| moments[i].time()).collect(),
            index: snapshots,
        }
    }

    /// The base of a restore at `t`: the newest snapshot at or before it
    /// (ties: the greatest seq, the last in order).
    fn at(&self, t: i64) -> Option<usize> {
        let after = self.times.partition_point(|&s| s <= t);
        after.checked_sub(1).map(|k| self.index[k])
    }

    /// The time of the first snapshot at or after `t` (None: there is none).
    fn first_from(&self, t: i64) -> Option<i64> {
        let k = self.times.partition_point(|&s| s < t);
        self.times.get(k).copied()
    }

    /// The time of the first snapshot strictly after `t`.
    fn first_after(&self, t: i64) -> Option<i64> {
        let k = self.times.partition_point(|&s| s <= t);
        self.times.get(k).copied()
    }
}

/// The closure of `kept`: what restoring at every kept moment needs, until
/// nothing more is needed.
///
/// A sweep over restore times in ascending order. Restoring at `t` needs
/// its base and every batch with `t_first <= t` and `t_last > base.time`.
/// A batch is decided at the first restore time at or after its `t_first`:
/// later times have the same or a newer base, so a batch not needed then is
/// never needed. A batch kept here whose `t_last` is later than `t` is a
/// new restore time ahead of the sweep; one ending at or before `t` has the
/// same base as `t` and needs nothing more, nor does a base (its restore
/// needs a subset of what `t` needs). Each batch is looked at once.
fn close(moments: &[Moment], bases: &Bases, mut kept: Vec<bool>) -> Vec<bool> {
    let mut batches: Vec<usize> = (0..moments.len())
        .filter(|&i| moments[i].kind == MomentKind::Batch)
        .collect();
    batches.sort_by_key(|&i| moments[i].t_first);
    let mut restore_times: BinaryHeap<Reverse<i64>> = (0..moments.len())
        .filter(|&i| kept[i])
        .map(|i| Reverse(moments[i].time()))
        .collect();
    let mut next_batch = 0;
    while let Some(Reverse(t)) = restore_times.pop() {
        let base = bases.at(t);
        if let Some(b) = base {
            kept[b] = true;
        }
        let base_time = base.map(|b| moments[b].time());
        while let Some(&b) = batches.get(next_batch) {
            let batch = &moments[b];
            if batch.t_first > t {
                break;
            }
            next_batch += 1;
            if base_time.is_some_and(|bt| batch.t_last <= bt) {
                continue;
            }
            if !kept[b] && batch.t_last > t {
                restore_times.push(Reverse(batch.t_last));
            }
            kept[b] = true;
        }
    }
    kept
}

/// The times `[lo, hi)` (hi None: no end) of the moments whose restore
/// needs moment `i`: for a batch, those from its `t_first` to the first
/// snapshot at or after its `t_last` (a base newer than the batch's end
/// excludes it); for a snapshot, those whose base it is. A snapshot that
/// is nobody's base (an older one at the same time) gets an empty span.
fn needers_span(m: &Moment, i: usize, bases: &Bases) -> (i64, Option<i64>) {
    match m.kind {
        MomentKind::Batch => (m.t_first, bases.first_from(m.t_last)),
        MomentKind::Snapshot if bases.at(m.time()) == Some(i) => {
            (m.time(), bases.first_after(m.time()))
        }
        MomentKind::Snapshot => (m.time(), Some(m.time())),
    }
}

/// A set of moments by time, answering "the smallest seq among those with
/// a time in `[lo, hi)`" in O(1) after O(n log n) setup (a sparse table of
/// minimums over runs of 2^k).
struct KeptTimes {
    /// (time, seq, moment index), ascending.
    keys: Vec<(i64, u64, usize)>,
    /// `min_of[k][j]`: the smallest seq of `keys[j .. j + 2^k]`.
    min_of: Vec<Vec<u64>>,
}

impl KeptTimes {
    fn new(moments: &[Moment], member: &[bool]) -> KeptTimes {
        let mut keys: Vec<(i64, u64, usize)> = (0..moments.len())
            .filter(|&i| member[i])
            .map(|i| (moments[i].time(), moments[i].seq, i))
            .collect();
        keys.sort_unstable();
        let mut min_of = vec![keys.iter().map(|k| k.1).collect::<Vec<u64>>()];
        let mut run = 1;
        while run * 2 <= keys.len() {
            let prev = &min_of[min_of.len() - 1];
            let next = (0..=keys.len() - run * 2)
                .map(|j| prev[j].min(prev[j + run]))
                .collect();
            min_of.push(next);
            run *= 2;
        }
        KeptTimes { keys, min_of }
    }

    /// The smallest seq among members with a time in `[lo, hi)`, leaving
    /// out the member `except` (its key: time, seq, moment index).
    fn min_seq(&self, lo: i64, hi: Option<i64>, except: Option<(i64, u64, usize)>) -> Option<u64> {
        let from = self.keys.partition_point(|k| k.0 < lo);
        let to = match hi {
            Some(hi) => self.keys.partition_point(|k| k.0 < hi),
            None => self.keys.len(),
        };
        let skip = except
            .and_then(|key| self.keys.binary_search(&key).ok())
            .filter(|p| (from..to).contains(p));
        match skip {
            Some(p) => Self::min_opt(self.min_in(from, p), self.min_in(p + 1, to)),
            None => self.min_in(from, to),
        }
    }

    /// The smallest seq of `keys[from..to]`.
    fn min_in(&self, from: usize, to: usize) -> Option<u64> {
        if from >= to {
            return None;
        }
        let level = (usize::BITS - 1 - (to - from).leading_zeros()) as usize;
        let row = &self.min_of[level];
        Some(row[from].min(row[to - (1 << level)]))
    }

    fn min_opt(a: Option<u64>, b: Option<u64>) -> Option<u64> {
        match (a, b) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    const MINUTE: i64 = NS_PER_MINUTE;
    const HOUR: i64 = NS_PER_HOUR;
    const DAY: i64 = NS_PER_DAY;

    fn at(rfc3339: &str) -> i64 {
        DateTime::parse_from_rfc3339(rfc3339)
            .unwrap()
            .timestamp_nanos_opt()
            .unwrap()
    }

    fn snapshot(seq: u64, time: i64) -> Moment {
        Moment {
            seq,
            kind: MomentKind::Snapshot,
            t_first: time,
            t_last: time,
        }
    }

    fn batch(seq: u64, t_first: i64, t_last: i64) -> Moment {
        Moment {
            seq,
            kind: MomentKind::Batch,
            t_first,
            t_last,
        }
    }

    /// Every tier off: only the newest moment and what it needs are kept.
    fn only_newest() -> Windows {
        Windows {
            all: Some(0),
            hourly: Some(0),
            daily: Some(0),
            weekly: Some(0),
            monthly: Some(0),
            yearly: Some(0),
        }
    }

    fn policy(
        all: &str,
        hourly: &str,
        daily: &str,
        weekly: &str,
        monthly: &str,
        yearly: &str,
    ) -> Windows {
        RetentionPolicy {
            keep_all_within: all.into(),
            keep_hourly_within: hourly.into(),
            keep_daily_within: daily.into(),
            keep_weekly_within: weekly.into(),
            keep_monthly_within: monthly.into(),
            keep_yearly_within: yearly.into(),
        }
        .windows()
        .unwrap()
    }

    fn kept_seqs(decisions: &[Decision]) -> BTreeSet<u64> {
        decisions.iter().filter(|d| d.keep).map(|d| d.seq).collect()
    }

    fn reasons_of(decisions: &[Decision], seq: u64) -> Vec<String> {
        let d = decisions.iter().find(|d| d.seq == seq).unwrap();
        d.reasons.iter().map(|r| r.to_string()).collect()
    }

    /// xorshift64: random enough for histories, no extra crate.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }

        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }

        fn shuffle<T>(&mut self, items: &mut [T]) {
            for i in (1..items.len()).rev() {
                items.swap(i, self.below(i as u64 + 1) as usize);
            }
        }
    }

    #[test]
    fn default_policy_parses() {
        let w = RetentionPolicy::default().windows().unwrap();
        assert_eq!(
            w,
            Windows {
                all: Some(DAY),
                hourly: Some(7 * DAY),
                daily: Some(90 * DAY),
                weekly: Some(365 * DAY),
                monthly: Some(5 * 365 * DAY),
                yearly: None,
            }
        );
        assert!(RetentionPolicy::default().is_default());
        // Every key is optional; unknown keys are refused.
        let empty: RetentionPolicy = toml::from_str("").unwrap();
        assert_eq!(empty, RetentionPolicy::default());
        let one: RetentionPolicy = toml::from_str("keep_daily_within = \"30d\"").unwrap();
        assert_eq!(one.keep_daily_within, "30d");
        assert_eq!(one.keep_hourly_within, "7d");
        assert!(!one.is_default());
        assert!(toml::from_str::<RetentionPolicy>("keep_daily = \"30d\"").is_err());
    }

    #[test]
    fn durations() {
        for (text, ns) in [
            ("0s", Some(0)),
            ("45s", Some(45 * NS_PER_SECOND)),
            ("90m", Some(90 * MINUTE)),
            ("24h", Some(DAY)),
            ("90d", Some(90 * DAY)),
            ("2w", Some(14 * DAY)),
            ("1y", Some(365 * DAY)),
            ("1d12h", Some(36 * HOUR)),
            ("forever", None),
        ] {
            assert_eq!(parse_duration(text), Some(ns), "{text}");
        }
        for bad in [
            "",
            "d",
            "10",
            "-1d",
            "+1d",
            "1.5d",
            "1x",
            "1D",
            "1d ",
            " 1d",
            "1 d",
            "forever1",
            "Forever",
            "1d-2h",
            "300y",
            "9223372036854775807s",
            "99999999999999999999s",
        ] {
            assert_eq!(parse_duration(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn bad_durations_name_the_key_and_value() {
        let bad = RetentionPolicy {
            keep_daily_within: "9x".into(),
            ..RetentionPolicy::default()
        };
        assert_eq!(
            bad.windows().unwrap_err(),
            "retention.keep_daily_within = \"9x\": use a number with s, m, h, d, w or y \
             (e.g. \"90d\"), \"0s\" to turn the tier off, or \"forever\""
        );
        let two = RetentionPolicy {
            keep_all_within: "-1h".into(),
            keep_yearly_within: "always".into(),
            ..RetentionPolicy::default()
        };
        let e = two.windows().unwrap_err();
        assert!(e.contains("retention.keep_all_within = \"-1h\""), "{e}");
        assert!(
            e.contains("retention.keep_yearly_within = \"always\""),
            "{e}"
        );
    }

    #[test]
    fn reasons_render_like_kopia_tags() {
        let reasons = vec![
            Reason::Newest,
            Reason::All,
            Reason::Hourly,
            Reason::Daily,
            Reason::Weekly,
            Reason::Monthly,
            Reason::Yearly,
            Reason::NeededBy(42),
        ];
        let json = serde_json::to_string(&reasons).unwrap();
        assert_eq!(
            json,
            r#"["newest","all","hourly","daily","weekly","monthly","yearly","needed-by 42"]"#
        );
        assert_eq!(serde_json::from_str::<Vec<Reason>>(&json).unwrap(), reasons);
        assert!(serde_json::from_str::<Reason>(r#""needed-by x""#).is_err());
        assert!(serde_json::from_str::<Reason>(r#""sometimes""#).is_err());
    }

    #[test]
    fn nothing_to_decide() {
        assert!(plan(&RetentionPolicy::default().windows().unwrap(), &[]).is_empty());
    }

    /// Snapshots on the hour and batches every 10 minutes (each spanning 4
    /// minutes) through January 2024 (1 January is a Monday), under a short
    /// policy, worked out by hand. The newest moment is 30 Jan 23:50.
    ///   all 2h    (from 30 Jan 21:50): 21:50, 22:00 .. 23:50
    ///   hourly 6h (from 17:50): 17:50, 18:50, .., 23:50
    ///   daily 3d  (from 27 Jan 23:50): 27, 28, 29, 30 Jan 23:50
    ///   weekly 3w (from 9 Jan 23:50): the weeks' last moments, 14, 21, 28 Jan
    ///             23:50, and the newest (week 5 runs to 4 Feb)
    ///   monthly forever: January's last is the newest; yearly off
    /// A kept batch at hh:50 keeps its base hh:00 and the hour's batches, so
    /// exactly these hours are kept whole: 30 Jan 17:00..23:00 (7), 23:00 on
    /// 27, 28, 29 (3), 14 and 21 Jan (2): 12 hours of 6 moments = 72.
    #[test]
    fn thirty_days_of_hourly_snapshots_and_ten_minute_batches() {
        let start = at("2024-01-01T00:00:00Z");
        let mut moments = Vec::new();
        for hour in 0..30 * 24 {
            let h = start + hour * HOUR;
            moments.push(snapshot(moments.len() as u64 + 1, h));
            for k in 1..=5 {
                let t = h + k * 10 * MINUTE;
                moments.push(batch(moments.len() as u64 + 1, t - 4 * MINUTE, t));
            }
        }
        // Moments may come in any order.
        Rng(0x9e37_79b9_7f4a_7c15).shuffle(&mut moments);
        let windows = policy("2h", "6h", "3d", "3w", "forever", "0s");
        let decisions = plan(&windows, &moments);

        let mut kept_hours: BTreeSet<i64> = (17..=23)
            .map(|h| at("2024-01-30T00:00:00Z") + h * HOUR)
            .collect();
        for day in ["14", "21", "27", "28", "29"] {
            kept_hours.insert(at(&format!("2024-01-{day}T23:00:00Z")));
        }
        for (m, d) in moments.iter().zip(&decisions) {
            assert_eq!((d.seq, d.time), (m.seq, m.time()));
            let hour = m.time().div_euclid(HOUR) * HOUR;
            assert_eq!(d.keep, kept_hours.contains(&hour), "{d:?}");
            assert_eq!(d.keep, !d.reasons.is_empty(), "{d:?}");
        }
        assert_eq!(kept_seqs(&decisions).len(), 72);

        let seq = |rfc: &str| moments.iter().find(|m| m.time() == at(rfc)).unwrap().seq;
        let why = |rfc: &str| reasons_of(&decisions, seq(rfc));
        let needed_by = |rfc: &str| vec![format!("needed-by {}", seq(rfc))];
        assert_eq!(
            why("2024-01-30T23:50:00Z"),
            ["newest", "all", "hourly", "daily", "weekly", "monthly"]
        );
        assert_eq!(why("2024-01-30T22:00:00Z"), ["all"]);
        assert_eq!(why("2024-01-30T21:50:00Z"), ["all", "hourly"]);
        assert_eq!(
            why("2024-01-30T21:40:00Z"),
            needed_by("2024-01-30T21:50:00Z")
        );
        assert_eq!(
            why("2024-01-30T21:00:00Z"),
            needed_by("2024-01-30T21:50:00Z")
        );
        assert_eq!(why("2024-01-30T17:50:00Z"), ["hourly"]);
        assert_eq!(
            why("2024-01-30T17:00:00Z"),
            needed_by("2024-01-30T17:50:00Z")
        );
        assert_eq!(why("2024-01-28T23:50:00Z"), ["daily", "weekly"]);
        // The window's start is inside it.
        assert_eq!(why("2024-01-27T23:50:00Z"), ["daily"]);
        assert_eq!(
            why("2024-01-27T23:10:00Z"),
            needed_by("2024-01-27T23:50:00Z")
        );
        assert_eq!(why("2024-01-21T23:50:00Z"), ["weekly"]);
        assert!(why("2024-01-09T23:50:00Z").is_empty());
    }

    #[test]
    fn newest_is_always_kept() {
        // Every tier off: a lone moment is still kept.
        let lone = plan(&only_newest(), &[snapshot(7, 0)]);
        assert_eq!(lone[0].reasons, [Reason::Newest]);
        // The newest is a batch: it keeps its base and the batches since.
        let h = at("2025-03-01T10:00:00Z");
        let moments = [
            snapshot(1, h - 5 * HOUR),
            snapshot(2, h),
            batch(3, h + MINUTE, h + 5 * MINUTE),
            batch(4, h + 6 * MINUTE, h + 9 * MINUTE),
        ];
        let decisions = plan(&only_newest(), &moments);
        assert_eq!(kept_seqs(&decisions), BTreeSet::from([2, 3, 4]));
        assert_eq!(reasons_of(&decisions, 4), ["newest"]);
        assert_eq!(reasons_of(&decisions, 2), ["needed-by 4"]);
        // Equal times: the greater seq is the newer.
        let tied = plan(&only_newest(), &[snapshot(9, h), batch(8, h, h)]);
        assert_eq!(tied[0].reasons, [Reason::Newest]);
        assert!(!tied[1].keep);
    }

    /// Hourly snapshots from 1 to 10 January, then the server is off for two
    /// weeks. The windows reach back from the last snapshot, not from the
    /// clock, so every prune during the outage keeps the last day whole and
    /// hourly the last week, as the day the server stopped.
    #[test]
    fn a_server_off_for_two_weeks_loses_nothing() {
        let start = at("2024-01-01T00:00:00Z");
        let moments: Vec<Moment> = (0..=9 * 24)
            .map(|h| snapshot(h as u64 + 1, start + h * HOUR))
            .collect();
        let decisions = plan(&RetentionPolicy::default().windows().unwrap(), &moments);
        let newest = start + 9 * DAY;
        for d in &decisions {
            let in_last_week = d.time >= newest - 7 * DAY;
            let last_of_day = d.time.rem_euclid(DAY) == 23 * HOUR;
            assert_eq!(d.keep, in_last_week || last_of_day, "{d:?}");
            assert_eq!(d.time >= newest - DAY, d.reasons.contains(&Reason::All));
        }
        assert_eq!(kept_seqs(&decisions).len(), 7 * 24 + 1 + 2);
        // The same history two weeks later decides the same.
        let later: Vec<Moment> = moments
            .iter()
            .map(|m| snapshot(m.seq, m.time() + 14 * DAY))
            .collect();
        let later = plan(&RetentionPolicy::default().windows().unwrap(), &later);
        for (a, b) in decisions.iter().zip(&later) {
            assert_eq!((a.keep, &a.reasons), (b.keep, &b.reasons));
        }
    }

    #[test]
    fn a_kept_batch_keeps_its_base_and_the_batches_since() {
        let moments = [
            snapshot(1, 10),
            batch(2, 11, 15),
            batch(3, 16, 20),
            // Ends after the next snapshot: a restore after it needs it.
            batch(8, 28, 32),
            snapshot(4, 30),
            batch(5, 31, 35),
            batch(6, 36, 40),
            batch(7, 41, 45),
        ];
        let decisions = plan(&only_newest(), &moments);
        assert_eq!(kept_seqs(&decisions), BTreeSet::from([4, 5, 6, 7, 8]));
        for seq in [4, 5, 6, 8] {
            assert_eq!(reasons_of(&decisions, seq), ["needed-by 7"]);
        }
        // A snapshot at the same time as the base but earlier in the chain
        // is nobody's base.
        let twin = plan(
            &only_newest(),
            &[snapshot(1, 10), snapshot(2, 10), batch(3, 11, 12)],
        );
        assert_eq!(kept_seqs(&twin), BTreeSet::from([2, 3]));
    }

    /// A kept batch is a moment one can restore at: when it ends after a
    /// later snapshot, that snapshot and the batches it needs are kept too.
    #[test]
    fn closure_follows_batches_past_later_snapshots() {
        let moments = [
            snapshot(1, 10),
            snapshot(2, 20),
            snapshot(3, 30),
            batch(4, 1, 2),
            batch(5, 0, 15),
            batch(6, 12, 25),
            batch(7, 22, 35),
            batch(8, 31, 33),
            batch(9, 40, 50),
        ];
        let mut start = vec![false; moments.len()];
        start[3] = true;
        let kept = close(&moments, &Bases::new(&moments), start);
        let kept: BTreeSet<u64> = (0..moments.len())
            .filter(|&i| kept[i])
            .map(|i| moments[i].seq)
            .collect();
        assert_eq!(kept, BTreeSet::from([1, 2, 3, 4, 5, 6, 7, 8]));
    }

    /// The restore at `t` from the moments in `set`, by the catalogue's rule
    /// (brute force): the base and the selected batches.
    fn restore_at(moments: &[Moment], set: &[bool], t: i64) -> (Option<usize>, BTreeSet<usize>) {
        let base = (0..moments.len())
            .filter(|&i| set[i] && moments[i].kind == MomentKind::Snapshot)
            .filter(|&i| moments[i].time() <= t)
            .max_by_key(|&i| moments[i].order_key());
        let base_time = base.map(|b| moments[b].time());
        let batches = (0..moments.len())
            .filter(|&i| set[i] && moments[i].kind == MomentKind::Batch)
            .filter(|&i| moments[i].t_first <= t)
            .filter(|&i| base_time.is_none_or(|bt| moments[i].t_last > bt))
            .collect();
        (base, batches)
    }

    /// The policy's own reasons, from the definitions (buckets named by
    /// chrono's formatting).
    fn reference_policy(w: &Windows, moments: &[Moment]) -> Vec<Vec<Reason>> {
        let newest = (0..moments.len())
            .max_by_key(|&i| moments[i].order_key())
            .unwrap();
        let n = moments[newest].time();
        let inside = |window: Option<i64>, m: &Moment| match window {
            None => true,
            Some(0) => false,
            Some(w) => m.time() >= n - w,
        };
        let bucket = |format: &str, m: &Moment| {
            DateTime::from_timestamp_nanos(m.time())
                .format(format)
                .to_string()
        };
        let tiers = [
            (Reason::Hourly, w.hourly, "%Y-%m-%d %H"),
            (Reason::Daily, w.daily, "%Y-%m-%d"),
            (Reason::Weekly, w.weekly, "%G-W%V"),
            (Reason::Monthly, w.monthly, "%Y-%m"),
            (Reason::Yearly, w.yearly, "%Y"),
        ];
        (0..moments.len())
            .map(|i| {
                let m = &moments[i];
                let mut reasons = Vec::new();
                if i == newest {
                    reasons.push(Reason::Newest);
                }
                if inside(w.all, m) {
                    reasons.push(Reason::All);
                }
                for (reason, window, format) in tiers {
                    let last = inside(window, m)
                        && !moments.iter().any(|o| {
                            inside(window, o)
                                && bucket(format, o) == bucket(format, m)
                                && o.order_key() > m.order_key()
                        });
                    if last {
                        reasons.push(reason);
                    }
                }
                reasons
            })
            .collect()
    }

    /// Which kept moments (other than `x`) need `x` to restore.
    fn needers(moments: &[Moment], kept: &[bool], x: usize) -> Vec<usize> {
        let all = vec![true; moments.len()];
        (0..moments.len())
            .filter(|&k| k != x && kept[k])
            .filter(|&k| {
                let (base, batches) = restore_at(moments, &all, moments[k].time());
                base == Some(x) || batches.contains(&x)
            })
            .collect()
    }

    /// Random small histories (any order, repeated times, batches across
    /// snapshots, random policies) checked against brute force: every kept
    /// moment restores from the kept moments exactly as from all; a
    /// forgotten moment's newest kept predecessor has the same base either
    /// way; nothing is kept that no policy rule or kept restore needs; and
    /// every reason is the true one.
    #[test]
    fn random_histories_restore_as_before() {
        let mut rng = Rng(0x2545_f491_4f6c_dd1d);
        let origin = at("2024-12-30T22:00:00Z");
        for case in 0..3000 {
            let unit = [7 * MINUTE, 5 * HOUR, 2 * DAY + 3 * HOUR][rng.below(3) as usize];
            let count = 1 + rng.below(20) as usize;
            let mut seqs: Vec<u64> = (1..=count as u64).collect();
            rng.shuffle(&mut seqs);
            let moments: Vec<Moment> = seqs
                .iter()
                .map(|&seq| {
                    let t = origin + rng.below(40) as i64 * unit;
                    if rng.below(3) == 0 {
                        snapshot(seq, t)
                    } else {
                        batch(seq, t - rng.below(4) as i64 * unit, t)
                    }
                })
                .collect();
            let mut window = || match rng.below(4) {
                0 => Some(0),
                1 => None,
                _ => Some(rng.below(30) as i64 * unit),
            };
            let w = Windows {
                all: window(),
                hourly: window(),
                daily: window(),
                weekly: window(),
                monthly: window(),
                yearly: window(),
            };
            let decisions = plan(&w, &moments);
            let ctx = format!("case {case}: {w:?} {moments:?} {decisions:?}");
            let kept: Vec<bool> = decisions.iter().map(|d| d.keep).collect();
            let all = vec![true; count];

            for (k, m) in moments.iter().enumerate().filter(|(k, _)| kept[*k]) {
                let (base, batches) = restore_at(&moments, &all, m.time());
                assert!(base.is_none_or(|b| kept[b]), "{ctx}");
                assert!(batches.iter().all(|&b| kept[b]), "{ctx}");
                assert_eq!(
                    restore_at(&moments, &kept, m.time()),
                    (base, batches),
                    "{ctx}"
                );
                assert_eq!(decisions[k].seq, m.seq, "{ctx}");
            }
            for f in (0..count).filter(|&f| !kept[f]) {
                let k = (0..count)
                    .filter(|&k| kept[k] && moments[k].time() <= moments[f].time())
                    .max_by_key(|&k| moments[k].order_key());
                if let Some(k) = k {
                    let t = moments[k].time();
                    assert_eq!(
                        restore_at(&moments, &kept, t).0,
                        restore_at(&moments, &all, t).0,
                        "{ctx}"
                    );
                }
            }

            // The kept set is the least one holding the policy's moments
            // and closed under "a kept moment's restore needs it".
            let by_policy = reference_policy(&w, &moments);
            let mut least: Vec<bool> = by_policy.iter().map(|r| !r.is_empty()).collect();
            loop {
                let grown: Vec<bool> = (0..count)
                    .map(|x| least[x] || !needers(&moments, &least, x).is_empty())
                    .collect();
                if grown == least {
                    break;
                }
                least = grown;
            }
            assert_eq!(kept, least, "{ctx}");

            for (x, d) in decisions.iter().enumerate() {
                let expected = if !by_policy[x].is_empty() || !kept[x] {
                    by_policy[x].clone()
                } else {
                    let needs = needers(&moments, &kept, x);
                    let by_policy_needs: Vec<usize> = needs
                        .iter()
                        .copied()
                        .filter(|&k| !by_policy[k].is_empty())
                        .collect();
                    let pick = if by_policy_needs.is_empty() {
                        needs
                    } else {
                        by_policy_needs
                    };
                    let seq = pick.iter().map(|&k| moments[k].seq).min().unwrap();
                    vec![Reason::NeededBy(seq)]
                };
                assert_eq!(d.reasons, expected, "moment {x}, {ctx}");
            }
        }
    }

    /// Large histories take O(n log n), also when every batch spans many
    /// snapshots (a quadratic closure would take minutes here).
    #[test]
    fn large_histories_are_quick() {
        let started = std::time::Instant::now();
        let start = at("2020-01-01T00:00:00Z");
        let mut moments = Vec::new();
        for hour in 0..40_000 {
            let h = start + hour * HOUR;
            moments.push(snapshot(moments.len() as u64 + 1, h));
            for k in 1..=5 {
                let t = h + k * 10 * MINUTE;
                // Every tenth batch reaches back across a thousand snapshots.
                let reach = if k == 1 && hour % 10 == 0 {
                    1000 * HOUR
                } else {
                    4 * MINUTE
                };
                moments.push(batch(moments.len() as u64 + 1, t - reach, t));
            }
        }
        let decisions = plan(&RetentionPolicy::default().windows().unwrap(), &moments);
        assert_eq!(decisions.len(), 240_000);
        assert!(decisions.last().unwrap().keep);
        assert!(
            started.elapsed() < std::time::Duration::from_secs(30),
            "{:?}",
            started.elapsed()
        );
    }
}
