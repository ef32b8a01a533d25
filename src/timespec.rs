//! TIME arguments: RFC 3339, `YYYY-MM-DD HH:MM[:SS]` in local time, `now`,
//! or relative (`90m ago`, `2h ago`, `3d ago`, `45s ago`, `1w ago`).

use chrono::{DateTime, Local, NaiveDateTime, TimeZone, Utc};

pub fn parse(input: &str, now: DateTime<Utc>) -> Result<DateTime<Utc>, String> {
    let s = input.trim();
    let bad = || {
        format!(
            "cannot read time {input:?}: use RFC 3339 (2026-11-24T17:00:00Z), \
             'YYYY-MM-DD HH:MM[:SS]' (local time), 'now', or 'N[smhdw] ago'"
        )
    };
    if s.eq_ignore_ascii_case("now") {
        return Ok(now);
    }
    if let Some(rel) = s.strip_suffix("ago") {
        let rel = rel.trim();
        let digits = rel
            .trim_end_matches(|c: char| c.is_ascii_alphabetic())
            .trim();
        let unit = rel[digits.len()..].trim();
        let n: i64 = digits.parse().map_err(|_| bad())?;
        let secs = match unit {
            "s" | "sec" | "secs" | "second" | "seconds" => 1,
            "m" | "min" | "mins" | "minute" | "minutes" => 60,
            "h" | "hour" | "hours" => 3600,
            "d" | "day" | "days" => 86_400,
            "w" | "week" | "weeks" => 604_800,
            _ => return Err(bad()),
        };
        let delta = n
            .checked_mul(secs)
            .and_then(chrono::TimeDelta::try_seconds)
            .ok_or_else(bad)?;
        return now.checked_sub_signed(delta).ok_or_else(bad);
    }
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Ok(t.with_timezone(&Utc));
    }
    for fmt in [
        "%Y-%m-%d %H:%M:%S%.f",
        "%Y-%m-%d %H:%M",
        "%Y-%m-%dT%H:%M:%S%.f",
    ] {
        if let Ok(naive) = NaiveDateTime::parse_from_str(s, fmt) {
            // An ambiguous local time (DST fold) resolves to the earlier instant;
            // a nonexistent one (DST gap) is an error.
            return Local
                .from_local_datetime(&naive)
                .earliest()
                .map(|t| t.with_timezone(&Utc))
                .ok_or_else(|| format!("{input:?} does not exist in local time (DST change)"));
        }
    }
    Err(bad())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn now() -> DateTime<Utc> {
        DateTime::parse_from_rfc3339("2026-11-25T12:00:00Z")
            .unwrap()
            .with_timezone(&Utc)
    }

    #[test]
    fn accepted_forms() {
        let n = now();
        assert_eq!(parse("now", n).unwrap(), n);
        assert_eq!(
            parse("90m ago", n).unwrap(),
            n - chrono::TimeDelta::minutes(90)
        );
        assert_eq!(parse("2h ago", n).unwrap(), n - chrono::TimeDelta::hours(2));
        assert_eq!(parse("3d ago", n).unwrap(), n - chrono::TimeDelta::days(3));
        assert_eq!(
            parse("2026-11-24T17:00:00+01:00", n).unwrap(),
            DateTime::parse_from_rfc3339("2026-11-24T16:00:00Z").unwrap()
        );
        let local = parse("2026-11-24 17:00", n).unwrap();
        assert_eq!(
            local.with_timezone(&Local).format("%H:%M").to_string(),
            "17:00"
        );
        assert!(parse("2026-11-24 17:00:05", n).is_ok());
    }

    #[test]
    fn rejected_forms() {
        for s in [
            "",
            "yesterday",
            "5 parsecs ago",
            "ago",
            "2026-13-01 10:00",
            "99999999999999999999h ago",
        ] {
            assert!(parse(s, now()).is_err(), "{s}");
        }
    }
}
