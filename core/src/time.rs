//! Time without a clock: a monotonic [`Instant`] of our own, wall-clock [`UnixTime`],
//! RFC 3339 and IMF-fixdate (HTTP `Date`) parsing and formatting.
//!
//! The core never reads a clock: callers pass `now` in.

use core::fmt;

pub use core::time::Duration;

/// A point on a monotonic clock, in milliseconds from an arbitrary origin chosen by the caller.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Instant {
    millis: u64,
}

/// Seconds since 1970-01-01T00:00:00Z (UTC, no leap seconds), as read from a wall clock or a
/// document. May be before the epoch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct UnixTime {
    secs: i64,
}

/// Why a time string was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum TimeError {
    /// The text does not have the expected shape.
    Syntax,
    /// A field is out of its range (month 13, day 31 in April, hour 24, …).
    Range,
    /// An RFC 3339 time with a non-UTC offset.
    NotUtc,
}

impl Instant {
    /// An instant `millis` milliseconds after the caller's origin.
    pub const fn from_millis(millis: u64) -> Self {
        Self { millis }
    }

    /// An instant `secs` seconds after the caller's origin.
    pub const fn from_secs(secs: u64) -> Self {
        Self {
            millis: secs.saturating_mul(1000),
        }
    }

    /// Milliseconds since the caller's origin.
    pub const fn as_millis(self) -> u64 {
        self.millis
    }

    /// `self − earlier`, or `None` when `earlier` is later.
    pub fn checked_duration_since(self, earlier: Instant) -> Option<Duration> {
        self.millis
            .checked_sub(earlier.millis)
            .map(Duration::from_millis)
    }

    /// `self − earlier`, or zero when `earlier` is later.
    pub fn saturating_duration_since(self, earlier: Instant) -> Duration {
        self.checked_duration_since(earlier)
            .unwrap_or(Duration::ZERO)
    }

    /// `self + d`, saturating at the end of time.
    pub fn saturating_add(self, d: Duration) -> Instant {
        Instant {
            millis: self.millis.saturating_add(duration_millis(d)),
        }
    }

    /// `self − d`, saturating at the origin.
    pub fn saturating_sub(self, d: Duration) -> Instant {
        Instant {
            millis: self.millis.saturating_sub(duration_millis(d)),
        }
    }
}

/// A duration in whole milliseconds, saturating at `u64::MAX`.
fn duration_millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl core::ops::Add<Duration> for Instant {
    type Output = Instant;
    fn add(self, rhs: Duration) -> Instant {
        self.saturating_add(rhs)
    }
}

impl core::ops::Sub<Duration> for Instant {
    type Output = Instant;
    fn sub(self, rhs: Duration) -> Instant {
        self.saturating_sub(rhs)
    }
}

impl core::ops::AddAssign<Duration> for Instant {
    fn add_assign(&mut self, rhs: Duration) {
        *self = self.saturating_add(rhs);
    }
}

impl core::ops::Sub<Instant> for Instant {
    type Output = Duration;
    /// Saturating: an earlier minus a later instant is zero.
    fn sub(self, rhs: Instant) -> Duration {
        self.saturating_duration_since(rhs)
    }
}

impl UnixTime {
    /// The Unix epoch.
    pub const EPOCH: UnixTime = UnixTime { secs: 0 };

    /// `secs` seconds after the epoch.
    pub const fn from_secs(secs: i64) -> Self {
        Self { secs }
    }

    /// Seconds after the epoch.
    pub const fn as_secs(self) -> i64 {
        self.secs
    }

    /// `self + d` (whole seconds), saturating.
    pub fn saturating_add(self, d: Duration) -> UnixTime {
        let add = i64::try_from(d.as_secs()).unwrap_or(i64::MAX);
        UnixTime {
            secs: self.secs.saturating_add(add),
        }
    }

    /// `self − earlier` in whole seconds, or `None` when `earlier` is not before `self`... or equal
    /// (equal gives `Some(ZERO)`).
    pub fn checked_duration_since(self, earlier: UnixTime) -> Option<Duration> {
        let diff = self.secs.checked_sub(earlier.secs)?;
        u64::try_from(diff).ok().map(Duration::from_secs)
    }

    /// The wall clock now, read from the system (std only).
    #[cfg(feature = "std")]
    pub fn now() -> UnixTime {
        Self::from(std::time::SystemTime::now())
    }
}

#[cfg(feature = "std")]
impl From<std::time::SystemTime> for UnixTime {
    fn from(t: std::time::SystemTime) -> Self {
        match t.duration_since(std::time::UNIX_EPOCH) {
            Ok(d) => UnixTime::from_secs(i64::try_from(d.as_secs()).unwrap_or(i64::MAX)),
            Err(e) => {
                UnixTime::from_secs(-i64::try_from(e.duration().as_secs()).unwrap_or(i64::MAX))
            }
        }
    }
}

impl UnixTime {
    /// The earliest time [`UnixTime::rfc3339`] and [`UnixTime::http_date`] can express:
    /// 0000-01-01T00:00:00Z.
    pub const MIN_FORMATTABLE: UnixTime = UnixTime {
        secs: -62_167_219_200,
    };

    /// The latest time [`UnixTime::rfc3339`] and [`UnixTime::http_date`] can express:
    /// 9999-12-31T23:59:59Z.
    pub const MAX_FORMATTABLE: UnixTime = UnixTime {
        secs: 253_402_300_799,
    };

    /// `self − d` (whole seconds), saturating.
    pub fn saturating_sub(self, d: Duration) -> UnixTime {
        let sub = i64::try_from(d.as_secs()).unwrap_or(i64::MAX);
        UnixTime {
            secs: self.secs.saturating_sub(sub),
        }
    }

    /// `self − earlier` in whole seconds, or zero when `earlier` is later.
    pub fn saturating_duration_since(self, earlier: UnixTime) -> Duration {
        self.checked_duration_since(earlier)
            .unwrap_or(Duration::ZERO)
    }

    /// Parses an RFC 3339 `date-time` in UTC, e.g. `2026-01-01T12:00:00Z`.
    ///
    /// - The separator between date and time may be `T`, `t` or a space (RFC 3339 §5.6 note).
    /// - The offset must denote UTC: `Z`, `z`, `+00:00` or `-00:00`; any other well-formed offset
    ///   is refused with [`TimeError::NotUtc`].
    /// - Fractional seconds (`.` and one or more digits) are accepted and truncated.
    /// - A leap second (`23:59:60`) is accepted and read as `23:59:59`, since Unix time has no
    ///   leap seconds.
    /// - Years are `0000`–`9999`; month, day (leap years included), hour and minute are
    ///   range-checked ([`TimeError::Range`]).
    pub fn parse_rfc3339(s: &str) -> Result<UnixTime, TimeError> {
        let b = s.as_bytes();
        if b.len() < 20 {
            return Err(TimeError::Syntax);
        }
        let year = digits(b, 0, 4)?;
        expect(b, 4, b'-')?;
        let month = digits(b, 5, 2)?;
        expect(b, 7, b'-')?;
        let day = digits(b, 8, 2)?;
        if !matches!(b[10], b'T' | b't' | b' ') {
            return Err(TimeError::Syntax);
        }
        let hour = digits(b, 11, 2)?;
        expect(b, 13, b':')?;
        let minute = digits(b, 14, 2)?;
        expect(b, 16, b':')?;
        let mut second = digits(b, 17, 2)?;
        let mut rest = &b[19..];
        if let [b'.', tail @ ..] = rest {
            let n = tail.iter().take_while(|c| c.is_ascii_digit()).count();
            if n == 0 {
                return Err(TimeError::Syntax);
            }
            rest = &tail[n..];
        }
        match rest {
            [b'Z' | b'z'] => {}
            [b'+' | b'-', h1, h2, b':', m1, m2] => {
                let all_digits = [h1, h2, m1, m2].iter().all(|c| c.is_ascii_digit());
                if !all_digits {
                    return Err(TimeError::Syntax);
                }
                let oh = u32::from(h1 - b'0') * 10 + u32::from(h2 - b'0');
                let om = u32::from(m1 - b'0') * 10 + u32::from(m2 - b'0');
                if oh > 23 || om > 59 {
                    return Err(TimeError::Range);
                }
                if oh != 0 || om != 0 {
                    return Err(TimeError::NotUtc);
                }
            }
            _ => return Err(TimeError::Syntax),
        }
        if second == 60 {
            if hour != 23 || minute != 59 {
                return Err(TimeError::Range);
            }
            second = 59;
        }
        from_civil(year, month, day, hour, minute, second)
    }

    /// Formats as RFC 3339 UTC without fraction: `2026-01-01T12:00:00Z`.
    ///
    /// Times outside `0000-01-01T00:00:00Z ..= 9999-12-31T23:59:59Z` are clamped to that range,
    /// so the output is always a valid RFC 3339 timestamp.
    pub fn rfc3339(self) -> impl fmt::Display {
        Rfc3339(self)
    }

    /// Parses an HTTP date (RFC 9110 §5.6.7): the preferred IMF-fixdate
    /// `Sun, 06 Nov 1994 08:49:37 GMT`, and the obsolete RFC 850
    /// (`Sunday, 06-Nov-94 08:49:37 GMT`) and asctime (`Sun Nov  6 08:49:37 1994`) forms.
    ///
    /// The day name must be a valid (case-sensitive) name but is not checked against the date.
    /// RFC 850's two-digit years `00`–`69` are read as 20xx and `70`–`99` as 19xx (the core has
    /// no clock to apply RFC 9110's "50 years in the future" rule).
    pub fn parse_http_date(s: &str) -> Result<UnixTime, TimeError> {
        let b = s.as_bytes();
        if b.len() == 29 && b.get(3) == Some(&b',') {
            return parse_imf_fixdate(b);
        }
        if b.len() == 24 && b.get(3) == Some(&b' ') {
            return parse_asctime(b);
        }
        parse_rfc850(b)
    }

    /// Formats as an IMF-fixdate: `Sun, 06 Nov 1994 08:49:37 GMT`.
    ///
    /// Clamped like [`UnixTime::rfc3339`].
    pub fn http_date(self) -> impl fmt::Display {
        HttpDate(self)
    }

    /// Breaks the (clamped) time into civil fields.
    fn civil(self) -> Civil {
        let secs = self
            .secs
            .clamp(Self::MIN_FORMATTABLE.secs, Self::MAX_FORMATTABLE.secs);
        let days = secs.div_euclid(86_400);
        let sod = secs.rem_euclid(86_400);
        let (year, month, day) = civil_from_days(days);
        Civil {
            year,
            month,
            day,
            hour: (sod / 3600) as u32,
            minute: (sod / 60 % 60) as u32,
            second: (sod % 60) as u32,
            // 1970-01-01 was a Thursday (index 4 with Sunday = 0).
            weekday: (days + 4).rem_euclid(7) as usize,
        }
    }
}

impl fmt::Display for TimeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TimeError::Syntax => "malformed timestamp",
            TimeError::Range => "timestamp field out of range",
            TimeError::NotUtc => "timestamp is not in UTC",
        })
    }
}

impl core::error::Error for TimeError {}

const DAY_NAMES: [&str; 7] = ["Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat"];
const LONG_DAY_NAMES: [&str; 7] = [
    "Sunday",
    "Monday",
    "Tuesday",
    "Wednesday",
    "Thursday",
    "Friday",
    "Saturday",
];
const MONTH_NAMES: [&str; 12] = [
    "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
];

struct Civil {
    year: i64,
    month: u32,
    day: u32,
    hour: u32,
    minute: u32,
    second: u32,
    weekday: usize,
}

struct Rfc3339(UnixTime);

impl fmt::Display for Rfc3339 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = self.0.civil();
        write!(
            f,
            "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
            c.year, c.month, c.day, c.hour, c.minute, c.second
        )
    }
}

struct HttpDate(UnixTime);

impl fmt::Display for HttpDate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = self.0.civil();
        let day_name = DAY_NAMES.get(c.weekday).copied().unwrap_or("Sun");
        let month_name = MONTH_NAMES
            .get(c.month.wrapping_sub(1) as usize)
            .copied()
            .unwrap_or("Jan");
        write!(
            f,
            "{day_name}, {:02} {month_name} {:04} {:02}:{:02}:{:02} GMT",
            c.day, c.year, c.hour, c.minute, c.second
        )
    }
}

/// `Sun, 06 Nov 1994 08:49:37 GMT`
fn parse_imf_fixdate(b: &[u8]) -> Result<UnixTime, TimeError> {
    day_name(&b[..3], &DAY_NAMES)?;
    expect(b, 3, b',')?;
    expect(b, 4, b' ')?;
    let day = digits(b, 5, 2)?;
    expect(b, 7, b' ')?;
    let month = month_name(&b[8..11])?;
    expect(b, 11, b' ')?;
    let year = digits(b, 12, 4)?;
    expect(b, 16, b' ')?;
    let (hour, minute, second) = hms(b, 17)?;
    if &b[25..] != b" GMT" {
        return Err(TimeError::Syntax);
    }
    from_http_fields(year, month, day, hour, minute, second)
}

/// `Sunday, 06-Nov-94 08:49:37 GMT`
fn parse_rfc850(b: &[u8]) -> Result<UnixTime, TimeError> {
    let comma = b.iter().position(|&c| c == b',').ok_or(TimeError::Syntax)?;
    day_name(&b[..comma], &LONG_DAY_NAMES)?;
    let b = &b[comma..];
    if b.len() != 24 {
        return Err(TimeError::Syntax);
    }
    expect(b, 1, b' ')?;
    let day = digits(b, 2, 2)?;
    expect(b, 4, b'-')?;
    let month = month_name(&b[5..8])?;
    expect(b, 8, b'-')?;
    let yy = digits(b, 9, 2)?;
    let year = if yy < 70 { 2000 + yy } else { 1900 + yy };
    expect(b, 11, b' ')?;
    let (hour, minute, second) = hms(b, 12)?;
    if &b[20..] != b" GMT" {
        return Err(TimeError::Syntax);
    }
    from_http_fields(year, month, day, hour, minute, second)
}

/// `Sun Nov  6 08:49:37 1994`
fn parse_asctime(b: &[u8]) -> Result<UnixTime, TimeError> {
    day_name(&b[..3], &DAY_NAMES)?;
    expect(b, 3, b' ')?;
    let month = month_name(&b[4..7])?;
    expect(b, 7, b' ')?;
    let day = match (b[8], b[9]) {
        (b' ', d) if d.is_ascii_digit() => u32::from(d - b'0'),
        _ => digits(b, 8, 2)?,
    };
    expect(b, 10, b' ')?;
    let (hour, minute, second) = hms(b, 11)?;
    expect(b, 19, b' ')?;
    let year = digits(b, 20, 4)?;
    from_http_fields(year, month, day, hour, minute, second)
}

/// `HH:MM:SS` at `at`.
fn hms(b: &[u8], at: usize) -> Result<(u32, u32, u32), TimeError> {
    let hour = digits(b, at, 2)?;
    expect(b, at + 2, b':')?;
    let minute = digits(b, at + 3, 2)?;
    expect(b, at + 5, b':')?;
    let second = digits(b, at + 6, 2)?;
    Ok((hour, minute, second))
}

/// HTTP dates allow a leap second (`60`) like RFC 3339; read it as `59`.
fn from_http_fields(
    year: u32,
    month: u32,
    day: u32,
    hour: u32,
    minute: u32,
    second: u32,
) -> Result<UnixTime, TimeError> {
    let second = if second == 60 && hour == 23 && minute == 59 {
        59
    } else {
        second
    };
    from_civil(year, month, day, hour, minute, second)
}

fn day_name(b: &[u8], names: &[&str; 7]) -> Result<(), TimeError> {
    if names.iter().any(|n| n.as_bytes() == b) {
        Ok(())
    } else {
        Err(TimeError::Syntax)
    }
}

fn month_name(b: &[u8]) -> Result<u32, TimeError> {
    MONTH_NAMES
        .iter()
        .position(|n| n.as_bytes() == b)
        .map(|i| i as u32 + 1)
        .ok_or(TimeError::Syntax)
}

/// `n` ASCII digits at `at` as a number.
fn digits(b: &[u8], at: usize, n: usize) -> Result<u32, TimeError> {
    let field = b.get(at..at + n).ok_or(TimeError::Syntax)?;
    field.iter().try_fold(0u32, |acc, &c| {
        if c.is_ascii_digit() {
            Ok(acc * 10 + u32::from(c - b'0'))
        } else {
            Err(TimeError::Syntax)
        }
    })
}

fn expect(b: &[u8], at: usize, want: u8) -> Result<(), TimeError> {
    if b.get(at) == Some(&want) {
        Ok(())
    } else {
        Err(TimeError::Syntax)
    }
}

fn is_leap(year: u32) -> bool {
    year % 4 == 0 && (year % 100 != 0 || year % 400 == 0)
}

fn days_in_month(year: u32, month: u32) -> u32 {
    match month {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if is_leap(year) => 29,
        2 => 28,
        _ => 0,
    }
}

/// Validated civil fields (year 0–9999) to a Unix time.
fn from_civil(
    year: u32,
    month: u32,
    day: u32,
    hour: u32,
    minute: u32,
    second: u32,
) -> Result<UnixTime, TimeError> {
    if year > 9999
        || !(1..=12).contains(&month)
        || day == 0
        || day > days_in_month(year, month)
        || hour > 23
        || minute > 59
        || second > 59
    {
        return Err(TimeError::Range);
    }
    let days = days_from_civil(i64::from(year), month, day);
    let sod = i64::from(hour * 3600 + minute * 60 + second);
    Ok(UnixTime::from_secs(days * 86_400 + sod))
}

/// Days since 1970-01-01 of a proleptic Gregorian date.
///
/// The year is shifted to start in March so the leap day is the last day of the year; 400-year
/// eras of 146 097 days make the arithmetic exact for any year.
fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let year_of_era = y.rem_euclid(400); // 0..=399
    let m = i64::from(month);
    let month_from_march = if m > 2 { m - 3 } else { m + 9 }; // 0..=11
    let day_of_year = (153 * month_from_march + 2) / 5 + i64::from(day) - 1; // 0..=365
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    // 719 468 days from 0000-03-01 to 1970-01-01.
    era * 146_097 + day_of_era - 719_468
}

/// The inverse of [`days_from_civil`]: (year, month 1–12, day 1–31).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097); // 0..=146096
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let mp = (5 * day_of_year + 2) / 153; // 0..=11, March-based
    let day = (day_of_year - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use alloc::string::ToString;
    use proptest::prelude::*;
    use proptest::test_runner::{Config, RngSeed};

    /// Property tests here are deterministic: a fixed seed and no persisted failures.
    pub(crate) fn deterministic(cases: u32) -> Config {
        Config {
            cases,
            rng_seed: RngSeed::Fixed(0x1075_c4ed),
            failure_persistence: None,
            ..Config::default()
        }
    }

    fn rfc(s: &str) -> Result<i64, TimeError> {
        UnixTime::parse_rfc3339(s).map(UnixTime::as_secs)
    }

    fn http(s: &str) -> Result<i64, TimeError> {
        UnixTime::parse_http_date(s).map(UnixTime::as_secs)
    }

    #[test]
    fn rfc3339_vectors() {
        assert_eq!(rfc("1970-01-01T00:00:00Z"), Ok(0));
        assert_eq!(rfc("2026-01-01T12:00:00Z"), Ok(1_767_268_800));
        assert_eq!(rfc("1994-11-06T08:49:37Z"), Ok(784_111_777));
        assert_eq!(rfc("1969-12-31T23:59:59Z"), Ok(-1));
        assert_eq!(rfc("2000-02-29T00:00:00Z"), Ok(951_782_400));
        assert_eq!(rfc("2024-02-29T23:59:59Z"), Ok(1_709_251_199));
        assert_eq!(
            rfc("0000-01-01T00:00:00Z"),
            Ok(UnixTime::MIN_FORMATTABLE.as_secs())
        );
        assert_eq!(
            rfc("9999-12-31T23:59:59Z"),
            Ok(UnixTime::MAX_FORMATTABLE.as_secs())
        );
    }

    #[test]
    fn rfc3339_accepted_variants() {
        let t = Ok(1_767_268_800);
        for s in [
            "2026-01-01t12:00:00z",
            "2026-01-01 12:00:00Z",
            "2026-01-01T12:00:00+00:00",
            "2026-01-01T12:00:00-00:00",
            "2026-01-01T12:00:00.999999999Z",
            "2026-01-01T12:00:00.0+00:00",
        ] {
            assert_eq!(rfc(s), t, "{s}");
        }
        // A leap second reads as the second before it.
        assert_eq!(rfc("2016-12-31T23:59:60Z"), rfc("2016-12-31T23:59:59Z"));
    }

    #[test]
    fn rfc3339_offsets_other_than_utc() {
        assert_eq!(rfc("2026-01-01T12:00:00+01:00"), Err(TimeError::NotUtc));
        assert_eq!(rfc("2026-01-01T12:00:00-05:30"), Err(TimeError::NotUtc));
        assert_eq!(rfc("2026-01-01T12:00:00+00:01"), Err(TimeError::NotUtc));
        assert_eq!(rfc("2026-01-01T12:00:00+24:00"), Err(TimeError::Range));
        assert_eq!(rfc("2026-01-01T12:00:00+00:60"), Err(TimeError::Range));
    }

    #[test]
    fn rfc3339_ranges() {
        for s in [
            "2023-02-29T00:00:00Z",
            "1900-02-29T00:00:00Z",
            "2100-02-29T00:00:00Z",
            "2026-04-31T00:00:00Z",
            "2026-13-01T00:00:00Z",
            "2026-00-01T00:00:00Z",
            "2026-01-00T00:00:00Z",
            "2026-01-32T00:00:00Z",
            "2026-01-01T24:00:00Z",
            "2026-01-01T23:60:00Z",
            "2026-01-01T23:59:61Z",
            "2026-01-01T12:00:60Z",
        ] {
            assert_eq!(rfc(s), Err(TimeError::Range), "{s}");
        }
    }

    #[test]
    fn rfc3339_syntax() {
        for s in [
            "",
            "2026-01-01",
            "2026-01-01T12:00:00",
            "2026-01-01T12:00Z",
            "2026-1-01T12:00:00Z",
            "2026-01-01X12:00:00Z",
            "2026-01-01T12:00:00.Z",
            "2026-01-01T12:00:00,5Z",
            "2026-01-01T12:00:00ZZ",
            "2026-01-01T12:00:00Z ",
            " 2026-01-01T12:00:00Z",
            "2026-01-01T12:00:00+0000",
            "2026-01-01T12:00:00+00",
            "2026-01-01T12:00:00UTC",
            "+2026-01-01T12:00:00Z",
            "2026-01-01T12:00:00+0a:00",
            "２026-01-01T12:00:00Z",
            "2026-01-01T12:0é:00Z",
        ] {
            assert_eq!(rfc(s), Err(TimeError::Syntax), "{s}");
        }
    }

    #[test]
    fn rfc3339_format() {
        assert_eq!(
            UnixTime::EPOCH.rfc3339().to_string(),
            "1970-01-01T00:00:00Z"
        );
        assert_eq!(
            UnixTime::from_secs(1_767_268_800).rfc3339().to_string(),
            "2026-01-01T12:00:00Z"
        );
        assert_eq!(
            UnixTime::from_secs(-1).rfc3339().to_string(),
            "1969-12-31T23:59:59Z"
        );
        assert_eq!(
            UnixTime::from_secs(951_868_799).rfc3339().to_string(),
            "2000-02-29T23:59:59Z"
        );
        assert_eq!(
            UnixTime::from_secs(i64::MIN).rfc3339().to_string(),
            "0000-01-01T00:00:00Z"
        );
        assert_eq!(
            UnixTime::from_secs(i64::MAX).rfc3339().to_string(),
            "9999-12-31T23:59:59Z"
        );
    }

    #[test]
    fn http_date_vectors() {
        assert_eq!(http("Sun, 06 Nov 1994 08:49:37 GMT"), Ok(784_111_777));
        assert_eq!(http("Sunday, 06-Nov-94 08:49:37 GMT"), Ok(784_111_777));
        assert_eq!(http("Sun Nov  6 08:49:37 1994"), Ok(784_111_777));
        assert_eq!(http("Thu, 01 Jan 2026 12:00:00 GMT"), Ok(1_767_268_800));
        assert_eq!(http("Thursday, 01-Jan-26 12:00:00 GMT"), Ok(1_767_268_800));
        assert_eq!(http("Thu Jan 01 12:00:00 2026"), Ok(1_767_268_800));
        assert_eq!(http("Thu, 29 Feb 2024 00:00:00 GMT"), Ok(1_709_164_800));
        // The day name is not cross-checked.
        assert_eq!(http("Mon, 06 Nov 1994 08:49:37 GMT"), Ok(784_111_777));
    }

    #[test]
    fn http_date_rejects() {
        for s in [
            "",
            "Sun, 06 Nov 1994 08:49:37 UTC",
            "Sun, 06 Nov 1994 08:49:37 GMT ",
            "sun, 06 Nov 1994 08:49:37 GMT",
            "Sun, 6 Nov 1994 08:49:37 GMT",
            "Sun, 06 nov 1994 08:49:37 GMT",
            "Sun 06 Nov 1994 08:49:37 GMT",
            "Sun, 06 Nov 94 08:49:37 GMT",
            "Sunday, 06-Nov-1994 08:49:37 GMT",
            "Sunday, 06-Nov-94 08:49:37",
            "Sun Nov 6 08:49:37 1994",
            "2026-01-01T12:00:00Z",
            "1767268800",
            "Xyz, 06 Nov 1994 08:49:37 GMT",
        ] {
            assert_eq!(http(s), Err(TimeError::Syntax), "{s:?}");
        }
        assert_eq!(http("Sat, 29 Feb 2025 00:00:00 GMT"), Err(TimeError::Range));
        assert_eq!(http("Sun, 06 Nov 1994 24:00:00 GMT"), Err(TimeError::Range));
    }

    #[test]
    fn http_date_format() {
        assert_eq!(
            UnixTime::from_secs(784_111_777).http_date().to_string(),
            "Sun, 06 Nov 1994 08:49:37 GMT"
        );
        assert_eq!(
            UnixTime::EPOCH.http_date().to_string(),
            "Thu, 01 Jan 1970 00:00:00 GMT"
        );
        assert_eq!(
            UnixTime::from_secs(i64::MAX).http_date().to_string(),
            "Fri, 31 Dec 9999 23:59:59 GMT"
        );
    }

    #[test]
    fn civil_days_round_trip_every_day() {
        let first = days_from_civil(0, 1, 1);
        let last = days_from_civil(9999, 12, 31);
        let (mut y, mut m, mut d) = (0i64, 1u32, 1u32);
        for days in first..=last {
            assert_eq!(civil_from_days(days), (y, m, d));
            assert_eq!(days_from_civil(y, m, d), days);
            d += 1;
            if d > days_in_month(y as u32, m) {
                d = 1;
                m += 1;
                if m > 12 {
                    m = 1;
                    y += 1;
                }
            }
        }
    }

    #[test]
    fn unix_time_arithmetic() {
        let t = UnixTime::from_secs(100);
        assert_eq!(t.saturating_sub(Duration::from_secs(30)).as_secs(), 70);
        assert_eq!(
            t.saturating_duration_since(UnixTime::from_secs(130)),
            Duration::ZERO
        );
        assert_eq!(
            t.saturating_duration_since(UnixTime::from_secs(40)),
            Duration::from_secs(60)
        );
        assert_eq!(
            UnixTime::from_secs(i64::MIN)
                .saturating_sub(Duration::MAX)
                .as_secs(),
            i64::MIN
        );
    }

    #[test]
    fn errors_display() {
        assert_eq!(TimeError::NotUtc.to_string(), "timestamp is not in UTC");
    }

    proptest! {
        #![proptest_config(deterministic(2048))]

        #[test]
        fn rfc3339_round_trip(secs in UnixTime::MIN_FORMATTABLE.as_secs()..=UnixTime::MAX_FORMATTABLE.as_secs()) {
            let t = UnixTime::from_secs(secs);
            prop_assert_eq!(UnixTime::parse_rfc3339(&t.rfc3339().to_string()), Ok(t));
        }

        #[test]
        fn http_date_round_trip(secs in UnixTime::MIN_FORMATTABLE.as_secs()..=UnixTime::MAX_FORMATTABLE.as_secs()) {
            let t = UnixTime::from_secs(secs);
            prop_assert_eq!(UnixTime::parse_http_date(&t.http_date().to_string()), Ok(t));
        }

        #[test]
        fn parsers_never_panic(s in ".{0,40}") {
            let _ = UnixTime::parse_rfc3339(&s);
            let _ = UnixTime::parse_http_date(&s);
        }

        #[test]
        fn rfc3339_shaped_noise_never_panics(s in "[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt ][0-9]{2}:[0-9]{2}:[0-9]{2}(\\.[0-9]{0,3})?([Zz]|[+-][0-9]{2}:[0-9]{2})") {
            if let Ok(t) = UnixTime::parse_rfc3339(&s) {
                prop_assert!(t >= UnixTime::MIN_FORMATTABLE && t <= UnixTime::MAX_FORMATTABLE);
            }
        }
    }
}
