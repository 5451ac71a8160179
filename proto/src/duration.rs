//! The one duration syntax of every padlock interface (flags, the CLI's
//! `--wait`, the HTTP `wait` parameter): `500ms`, `30s`, `1.5s`, `1m`,
//! `1h`, or a bare number of seconds.

use std::time::Duration;

/// The longest duration accepted anywhere (a year): longer ones mean
/// "never" anyway, and could overflow a deadline.
pub const MAX: Duration = Duration::from_secs(365 * 86_400);

/// Parses a duration; `Err` says what is wrong, with examples.
pub fn parse(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let (number, unit) = match text.find(|c: char| c.is_ascii_alphabetic()) {
        Some(i) => text.split_at(i),
        None => (text, "s"),
    };
    let value: f64 = number.trim().parse().map_err(|_| {
        format!("'{text}' is not a duration (examples: 500ms, 30s, 1.5s, 1m, 1h, or seconds)")
    })?;
    let seconds = match unit.trim() {
        "ms" => value / 1000.0,
        "s" => value,
        "m" => value * 60.0,
        "h" => value * 3600.0,
        other => {
            return Err(format!(
                "unknown unit '{other}' in '{text}' (use ms, s, m or h)"
            ));
        }
    };
    let duration = Duration::try_from_secs_f64(seconds).map_err(|e| format!("'{text}': {e}"))?;
    if duration > MAX {
        return Err(format!(
            "'{text}' is longer than the longest allowed, {}h (365 days)",
            MAX.as_secs() / 3600
        ));
    }
    Ok(duration)
}

/// A duration as a person writes it: `250ms`, `5s`, `1.5s`, `2m30s`,
/// `1h05m`.
pub fn display(d: Duration) -> String {
    let ms = d.as_millis();
    if ms < 1000 {
        return format!("{ms}ms");
    }
    let secs = d.as_secs();
    if secs < 60 {
        let tenths = (d.as_millis() % 1000) / 100;
        return if tenths == 0 {
            format!("{secs}s")
        } else {
            format!("{secs}.{tenths}s")
        };
    }
    if secs < 3600 {
        return match secs % 60 {
            0 => format!("{}m", secs / 60),
            s => format!("{}m{s:02}s", secs / 60),
        };
    }
    match (secs % 3600) / 60 {
        0 => format!("{}h", secs / 3600),
        m => format!("{}h{m:02}m", secs / 3600),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_form() {
        for (text, want) in [
            ("500ms", Duration::from_millis(500)),
            ("30s", Duration::from_secs(30)),
            ("1.5s", Duration::from_millis(1500)),
            ("1m", Duration::from_secs(60)),
            ("1h", Duration::from_secs(3600)),
            ("5", Duration::from_secs(5)),
            ("0", Duration::ZERO),
            (" 2m ", Duration::from_secs(120)),
        ] {
            assert_eq!(parse(text).unwrap(), want, "{text}");
        }
        assert!(parse("soon").unwrap_err().contains("not a duration"));
        assert!(parse("5d").unwrap_err().contains("unknown unit 'd'"));
        assert!(parse("-1s").is_err());
        assert!(parse("8761h").unwrap_err().contains("longest allowed"));
        assert!(parse("1e19").is_err(), "no exponents: 'e' is not a unit");
    }

    #[test]
    fn displays_as_written() {
        assert_eq!(display(Duration::ZERO), "0ms");
        assert_eq!(display(Duration::from_millis(250)), "250ms");
        assert_eq!(display(Duration::from_secs(5)), "5s");
        assert_eq!(display(Duration::from_millis(1500)), "1.5s");
        assert_eq!(display(Duration::from_secs(150)), "2m30s");
        assert_eq!(display(Duration::from_secs(3900)), "1h05m");
        assert_eq!(display(Duration::from_secs(7200)), "2h");
    }
}
