#![no_main]
//! Differential: core's RFC 3339 parser against the `time` crate, and core's HTTP date parser
//! (IMF-fixdate, and the obsolete RFC 850 and asctime forms) against `httpdate`. For the same
//! input both accept with the same instant, or both reject, except for these intended
//! differences, each checked precisely rather than skipped:
//!
//! RFC 3339 (`time::format_description::well_known::Rfc3339`):
//! - core takes only UTC (`Z`, `z`, `+00:00`, `-00:00`): with any other offset `time` may
//!   accept, and core must refuse with `NotUtc`;
//! - the date/time separator: core takes `T`, `t` or a space (RFC 3339 §5.6), `time` any
//!   byte: with another separator core must refuse;
//! - leap seconds: core reads `23:59:60` as `23:59:59` on any day (it has no leap second
//!   table); `time` only on the last day of a month (and gives `23:59:59.999999999`). On other
//!   days `time` must refuse;
//! - fractions: core truncates to whole seconds, so instants are compared in whole seconds
//!   (`unix_timestamp`).
//!
//! HTTP dates (`httpdate::parse_http_date`):
//! - `httpdate` trims surrounding whitespace, core does not: such input must be refused by
//!   core, and its trimmed form is compared;
//! - the day name: core checks it is a day name but not that it is the date's day, `httpdate`
//!   refuses a wrong one. When they disagree on that, the input with the right day name must
//!   give the same instant in both;
//! - years before 1970: `httpdate` refuses them (its type starts at the epoch);
//! - leap seconds: core reads `23:59:60` as `23:59:59`, `httpdate` refuses second 60. With
//!   `:59` instead both must agree;
//! - in RFC 850 dates `httpdate` does not look at the character between the date and the time
//!   (`06-Nov-94 08:49:37`); core wants the space. With a space there both must agree.
use std::time::UNIX_EPOCH;

use iotcred_core::{TimeError, UnixTime};
use libfuzzer_sys::fuzz_target;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

fuzz_target!(|s: &str| {
    rfc3339(s);
    http_date(s);
});

fn rfc3339(s: &str) {
    let core = UnixTime::parse_rfc3339(s);
    let reference = OffsetDateTime::parse(s, &Rfc3339);
    match (core, reference) {
        (Ok(c), Ok(r)) => {
            assert!(
                r.offset().is_utc(),
                "{s:?}: core took offset {}",
                r.offset()
            );
            assert_eq!(c.as_secs(), r.unix_timestamp(), "{s:?}");
        }
        (Err(_), Err(_)) => {}
        (Err(e), Ok(r)) => {
            // Another separator (any error), else another offset (`NotUtc`).
            if matches!(s.as_bytes()[10], b'T' | b't' | b' ') {
                assert!(
                    !r.offset().is_utc() && e == TimeError::NotUtc,
                    "{s:?}: core refused ({e}), time read {r}"
                );
            }
        }
        (Ok(c), Err(e)) => {
            // Only a leap second not at the end of a month.
            let b = s.as_bytes();
            let (year, month, day) = (num(&b[0..4]), num(&b[5..7]), num(&b[8..10]));
            assert!(
                &b[17..19] == b"60" && day < days_in_month(year, month),
                "{s:?}: core read {}, time refused ({e})",
                c.rfc3339()
            );
        }
    }
}

fn http_date(s: &str) {
    let trimmed = s.trim();
    if trimmed.len() != s.len() {
        assert!(
            UnixTime::parse_http_date(s).is_err(),
            "{s:?}: core took spaces"
        );
    }
    let s = trimmed;
    let core = UnixTime::parse_http_date(s);
    let reference = httpdate::parse_http_date(s)
        .map(|t| t.duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64));
    match (core, reference) {
        (Ok(c), Ok(Ok(r))) => assert_eq!(c.as_secs(), r, "{s:?}"),
        (Err(_), Err(_)) => {}
        (Ok(c), _) => {
            // Pre-1970, a wrong day name or a leap second: fix what can be fixed and compare.
            if c.as_secs() < 0 {
                return;
            }
            let fixed = with_day_name(s, c).replace(" 23:59:60", " 23:59:59");
            assert!(
                fixed != s,
                "{s:?}: core read {}, httpdate refused",
                c.rfc3339()
            );
            let again = httpdate::parse_http_date(&fixed)
                .ok()
                .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                .map(|d| d.as_secs() as i64);
            assert_eq!(again, Some(c.as_secs()), "{s:?} fixed to {fixed:?}");
        }
        (Err(e), Ok(r)) => {
            // Only an RFC 850 date whose space before the time is another character.
            let fixed = rfc850_space_fixed(s);
            assert!(
                fixed.as_deref().is_some_and(|f| f != s),
                "{s:?}: core refused ({e}), httpdate read {r:?}"
            );
            let again = fixed.and_then(|f| UnixTime::parse_http_date(&f).ok());
            assert_eq!(again.map(UnixTime::as_secs), r.ok(), "{s:?}");
        }
    }
}

/// For an RFC 850 date (`Sunday, 06-Nov-94 08:49:37 GMT`), `s` with a space between the date
/// and the time, whatever character was there.
fn rfc850_space_fixed(s: &str) -> Option<String> {
    let comma = s.find(',')?;
    let mut b = s.as_bytes().to_vec();
    let at = comma + 2 + 9;
    if b.len() != comma + 2 + 22 || !s.is_ascii() {
        return None;
    }
    b[at] = b' ';
    String::from_utf8(b).ok()
}

/// `s` with its day name replaced by the right one for `t` (short or long, as in `s`).
fn with_day_name(s: &str, t: UnixTime) -> String {
    const SHORT: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
    const LONG: [&str; 7] = [
        "Thursday",
        "Friday",
        "Saturday",
        "Sunday",
        "Monday",
        "Tuesday",
        "Wednesday",
    ];
    let weekday = t.as_secs().div_euclid(86_400).rem_euclid(7) as usize;
    match s.find(',') {
        // IMF-fixdate (`Sun,`) or RFC 850 (`Sunday,`).
        Some(3) => format!("{}{}", SHORT[weekday], &s[3..]),
        Some(comma) => format!("{}{}", LONG[weekday], &s[comma..]),
        // asctime (`Sun Nov  6 …`).
        None => format!("{}{}", SHORT[weekday], &s[3..]),
    }
}

fn num(b: &[u8]) -> u32 {
    b.iter().fold(0, |n, d| n * 10 + u32::from(d - b'0'))
}

fn days_in_month(year: u32, month: u32) -> u32 {
    let leap = year % 4 == 0 && (year % 100 != 0 || year % 400 == 0);
    match month {
        2 if leap => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}
