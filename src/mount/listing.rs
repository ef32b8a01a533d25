//! Which moments `btrship mount` shows, and under which `@GMT-` names.
//!
//! Windows lists one share's previous versions from one list of labels
//! (Samba's `FSCTL_GET_SHADOW_COPY_DATA`), so the list must stay short: a
//! few hundred labels answer quickly and fit any client's buffer (each
//! label costs 50 bytes; 64 KiB holds about 1,300).
//!
//! The moments listed are the ones the share's retention policy keeps
//! by its own rules (`newest`, `all`, `hourly` … `yearly`; a moment kept
//! only because a later one needs it is not listed). Two moments in one
//! UTC second share a label: the later one is shown. When more labels
//! than `max` remain, the coarser tiers win, so the list still reaches
//! back as far as the history does: first the newest moment, then every
//! yearly, monthly, weekly, daily and hourly pick, then the keep-all
//! window, each tier newest first, until `max` are chosen.

use crate::catalog::MomentRow;
use crate::retention::{self, Moment, MomentKind, Reason, Windows};
use chrono::DateTime;

/// One label of the listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    /// `@GMT-YYYY.MM.DD-HH.MM.SS` (UTC).
    pub label: String,
    /// The history object's place in its chain.
    pub seq: u64,
    /// The moment (ns since the Unix epoch): the share as it was then.
    pub time_ns: i64,
    pub kind: MomentKind,
}

/// The label of a moment: its UTC second.
pub fn label(time_ns: i64) -> String {
    DateTime::from_timestamp_nanos(time_ns)
        .format("@GMT-%Y.%m.%d-%H.%M.%S")
        .to_string()
}

/// How a reason ranks when the list must be cut: lower is kept first.
fn rank(r: &Reason) -> Option<u8> {
    Some(match r {
        Reason::Newest => 0,
        Reason::Yearly => 1,
        Reason::Monthly => 2,
        Reason::Weekly => 3,
        Reason::Daily => 4,
        Reason::Hourly => 5,
        Reason::All => 6,
        Reason::NeededBy(_) => return None,
    })
}

/// The labels to show, oldest first, and how many the policy would keep
/// before the cut to `max`.
pub fn choose(windows: &Windows, rows: &[MomentRow], max: usize) -> (Vec<Listed>, usize) {
    let live: Vec<&MomentRow> = rows.iter().filter(|r| !r.forgotten).collect();
    // A batch older than every snapshot has no base to apply it to.
    let Some(first_snapshot) = live.iter().filter(|r| r.snapshot).map(|r| r.t_last).min() else {
        return (Vec::new(), 0);
    };
    let moments: Vec<Moment> = live.iter().map(|r| Moment::from(*r)).collect();
    let decisions = retention::plan(windows, &moments);
    // label -> (best rank, the moment shown: the latest in that second)
    let mut by_label: std::collections::BTreeMap<String, (u8, Moment)> = Default::default();
    for (m, d) in moments.iter().zip(&decisions) {
        let Some(best) = d.reasons.iter().filter_map(rank).min() else {
            continue;
        };
        if m.t_last < first_snapshot {
            continue;
        }
        let entry = by_label.entry(label(m.t_last)).or_insert((best, *m));
        entry.0 = entry.0.min(best);
        if (m.t_last, m.seq) > (entry.1.t_last, entry.1.seq) {
            entry.1 = *m;
        }
    }
    let total = by_label.len();
    let mut all: Vec<(String, u8, Moment)> = by_label
        .into_iter()
        .map(|(l, (rank, m))| (l, rank, m))
        .collect();
    if all.len() > max {
        all.sort_by(|a, b| a.1.cmp(&b.1).then(b.2.t_last.cmp(&a.2.t_last)));
        all.truncate(max);
    }
    let mut out: Vec<Listed> = all
        .into_iter()
        .map(|(label, _, m)| Listed {
            label,
            seq: m.seq,
            time_ns: m.t_last,
            kind: m.kind,
        })
        .collect();
    out.sort_by_key(|l| (l.time_ns, l.seq));
    (out, total)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::retention::RetentionPolicy;

    const S: i64 = 1_000_000_000;
    const HOUR: i64 = 3600 * S;
    const DAY: i64 = 24 * HOUR;

    fn row(seq: u64, snapshot: bool, t: i64) -> MomentRow {
        MomentRow {
            seq,
            name: format!("o{seq}"),
            snapshot,
            t_first: t,
            t_last: t,
            forgotten: false,
        }
    }

    fn policy(toml: &str) -> Windows {
        let p: RetentionPolicy = toml::from_str(toml).unwrap();
        p.windows().unwrap()
    }

    #[test]
    fn labels_are_utc_seconds() {
        assert_eq!(label(0), "@GMT-1970.01.01-00.00.00");
        assert_eq!(
            label(1_764_763_200 * S + 999_999_999),
            "@GMT-2025.12.03-12.00.00"
        );
    }

    #[test]
    fn the_later_moment_of_one_second_is_shown() {
        let t0 = 1_764_763_200 * S;
        let rows = [
            row(1, true, t0),
            row(2, false, t0 + 10 * S + 100),
            row(3, false, t0 + 10 * S + 900),
        ];
        let (list, total) = choose(&RetentionPolicy::default().windows().unwrap(), &rows, 500);
        assert_eq!(total, 2);
        assert_eq!(list.len(), 2);
        assert_eq!(list[1].seq, 3);
        assert_eq!(list[1].time_ns, t0 + 10 * S + 900);
    }

    #[test]
    fn forgotten_and_needed_only_moments_and_batches_before_any_snapshot_are_not_listed() {
        let t0 = 1_764_763_200 * S;
        let mut rows = vec![
            row(1, false, t0 - 5 * S),
            row(2, true, t0),
            row(3, false, t0 + 30 * DAY),
        ];
        rows.push(MomentRow {
            forgotten: true,
            ..row(4, false, t0 + 31 * DAY)
        });
        rows.push(row(5, true, t0 + 40 * DAY));
        // Keep only the newest: the snapshot at seq 2 is needed by nothing
        // then, and seq 3 is neither newest nor in any window.
        let w = policy(
            "keep_all_within = \"1s\"\nkeep_hourly_within = \"0s\"\nkeep_daily_within = \"0s\"\nkeep_weekly_within = \"0s\"\nkeep_monthly_within = \"0s\"\nkeep_yearly_within = \"0s\"\n",
        );
        let (list, _) = choose(&w, &rows, 500);
        let seqs: Vec<u64> = list.iter().map(|l| l.seq).collect();
        assert_eq!(seqs, vec![5]);
        let (list, _) = choose(&RetentionPolicy::default().windows().unwrap(), &rows, 500);
        let seqs: Vec<u64> = list.iter().map(|l| l.seq).collect();
        assert!(!seqs.contains(&1), "{seqs:?}");
        assert!(!seqs.contains(&4), "{seqs:?}");
        assert!(seqs.contains(&2) && seqs.contains(&5), "{seqs:?}");
    }

    #[test]
    fn a_cut_keeps_the_coarse_tiers_so_the_list_reaches_back() {
        // Two years of hourly snapshots: thousands kept by the default
        // policy (24h all, 7d hourly, 90d daily, 1y weekly, 5y monthly).
        let t0 = 1_700_000_000 * S;
        let rows: Vec<MomentRow> = (0..(2 * 365 * 24))
            .map(|i| row(i as u64 + 1, true, t0 + i * HOUR))
            .collect();
        let w = RetentionPolicy::default().windows().unwrap();
        let (all, total) = choose(&w, &rows, 100_000);
        assert_eq!(all.len(), total);
        assert!(total > 200, "{total}");
        let (cut, total2) = choose(&w, &rows, 60);
        assert_eq!(total2, total);
        assert_eq!(cut.len(), 60);
        // The newest and the oldest kept moment (a monthly pick two years
        // back) both survive the cut; the keep-all hours go first.
        assert_eq!(cut.last().unwrap().seq, rows.last().unwrap().seq);
        assert_eq!(cut[0].seq, all[0].seq);
        assert!(cut.windows(2).all(|p| p[0].time_ns < p[1].time_ns));
        let newest = rows.last().unwrap().t_last;
        let recent = cut.iter().filter(|l| newest - l.time_ns < DAY).count();
        assert!(recent < 24, "{recent} of 60 labels are from the last day");
    }
}
