//! Reading the output of Rust test executables (libtest's plain format): which tests ran, how
//! each ended, and the first line of why a failed one failed.
//!
//! Tests run one at a time (`--test-threads=1`) print `test NAME ... ` before and the outcome
//! after the test; processes a test starts may write in between, so an outcome may stand on a
//! later line of its own. The `failures:` list and the `test result:` line are authoritative.

use serde_json::{json, Value};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Passed,
    Failed,
    Ignored,
}

impl Outcome {
    fn parse(word: &str) -> Option<Self> {
        match word {
            "ok" => Some(Outcome::Passed),
            "FAILED" => Some(Outcome::Failed),
            w if w == "ignored" || w.starts_with("ignored,") => Some(Outcome::Ignored),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Outcome::Passed => "passed",
            Outcome::Failed => "failed",
            Outcome::Ignored => "ignored",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TestCase {
    pub name: String,
    pub outcome: Outcome,
    /// For a failed test: the first line of its panic message, or what ended it.
    pub reason: Option<String>,
}

impl TestCase {
    pub fn to_json(&self) -> Value {
        json!({"name": self.name, "outcome": self.outcome.name(), "reason": self.reason})
    }

    pub fn from_json(v: &Value) -> Option<Self> {
        let outcome = match v["outcome"].as_str()? {
            "passed" => Outcome::Passed,
            "failed" => Outcome::Failed,
            "ignored" => Outcome::Ignored,
            _ => return None,
        };
        Some(TestCase {
            name: v["name"].as_str()?.to_owned(),
            outcome,
            reason: v["reason"].as_str().map(str::to_owned),
        })
    }
}

/// Totals of the `test result:` lines.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Totals {
    pub passed: u32,
    pub failed: u32,
    pub ignored: u32,
    /// How many `test result:` lines there were (one per finished executable).
    pub results: u32,
}

impl Totals {
    /// Adds one `test result: ok. 3 passed; 1 failed; 0 ignored; ...` line; false if `line`
    /// is not one.
    pub fn add_line(&mut self, line: &str) -> bool {
        let Some(rest) = line.trim().strip_prefix("test result: ") else {
            return false;
        };
        // `FAILED. 1 passed`, ` 1 failed`, ...: the number is the word before the name.
        let count = |what: &str| -> u32 {
            rest.split(';')
                .find_map(|part| {
                    let mut words = part.split_whitespace().rev();
                    (words.next()? == what).then_some(())?;
                    words.next()?.parse().ok()
                })
                .unwrap_or(0)
        };
        self.passed += count("passed");
        self.failed += count("failed");
        self.ignored += count("ignored");
        self.results += 1;
        true
    }
}

/// The tests of one executable's output, in the order they started. A test that started but
/// has no outcome (the executable was killed or crashed) is failed with `unfinished` as reason.
pub fn parse(output: &str, unfinished: &str) -> Vec<TestCase> {
    let mut cases: Vec<TestCase> = Vec::new();
    let mut pending: Option<String> = None;
    let mut failed_list = false;
    let mut listed_failed: Vec<String> = Vec::new();
    for line in output.lines() {
        if let Some(rest) = line.strip_prefix("test ") {
            if let Some((name, after)) = rest.split_once(" ... ") {
                let name = name.to_owned();
                match Outcome::parse(after.trim()) {
                    Some(o) => push(&mut cases, name, o),
                    None => pending = Some(name),
                }
                failed_list = false;
                continue;
            }
        }
        if let Some(o) = Outcome::parse(line.trim()) {
            if let Some(name) = pending.take() {
                push(&mut cases, name, o);
                continue;
            }
        }
        // A test's outcome may follow other output on the same line.
        if let Some(name) = &pending {
            for (suffix, o) in [(" ok", Outcome::Passed), (" FAILED", Outcome::Failed)] {
                if line.ends_with(suffix) {
                    let name = name.clone();
                    pending = None;
                    push(&mut cases, name, o);
                    break;
                }
            }
        }
        if line == "failures:" {
            failed_list = true;
        } else if failed_list && line.starts_with("    ") && !line.trim().is_empty() {
            listed_failed.push(line.trim().to_owned());
        } else if line.starts_with("test result:") {
            failed_list = false;
        }
    }
    if let Some(name) = pending {
        cases.push(TestCase {
            name,
            outcome: Outcome::Failed,
            reason: Some(unfinished.to_owned()),
        });
    }
    for name in listed_failed {
        match cases.iter_mut().find(|c| c.name == name) {
            Some(c) => c.outcome = Outcome::Failed,
            None => push(&mut cases, name, Outcome::Failed),
        }
    }
    for c in cases.iter_mut() {
        if c.outcome == Outcome::Failed && c.reason.is_none() {
            c.reason = Some(panic_message(output, &c.name).unwrap_or_else(|| {
                "failed (no panic message in the output; see the log)".to_owned()
            }));
        }
    }
    cases
}

fn push(cases: &mut Vec<TestCase>, name: String, outcome: Outcome) {
    cases.push(TestCase {
        name,
        outcome,
        reason: None,
    });
}

/// The first line of `name`'s panic message in its `---- NAME stdout ----` section.
fn panic_message(output: &str, name: &str) -> Option<String> {
    let header = format!("---- {name} stdout ----");
    let section = &output[output.find(&header)? + header.len()..];
    let mut lines = section.lines().skip_while(|l| !l.contains("panicked at"));
    let at = lines.next()?;
    // Since Rust 1.73: `thread 'x' panicked at file:line:col:` then the message.
    let msg = if at.trim_end().ends_with(':') {
        lines.find(|l| !l.trim().is_empty())?.trim().to_owned()
    } else {
        at.trim().to_owned()
    };
    Some(truncate(&msg, 300))
}

pub fn truncate(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        return s.to_owned();
    }
    let cut: String = s.chars().take(max).collect();
    format!("{cut}...")
}

#[cfg(test)]
mod tests {
    use super::*;

    const OUT: &str = "\
running 3 tests
test a::one ... ok
test a::two ... etcd said something
FAILED
test a::three ... ignored, slow

failures:

---- a::two stdout ----
thread 'a::two' panicked at tests/tests/x.rs:10:5:
the verifier rejected flannel_encap: R3 min value is outside
note: run with `RUST_BACKTRACE=1` environment variable to display a backtrace


failures:
    a::two

test result: FAILED. 1 passed; 1 failed; 1 ignored; 0 measured; 0 filtered out; finished in 1.00s
";

    #[test]
    fn outcomes_reasons_and_totals() {
        let cases = parse(OUT, "killed");
        assert_eq!(
            cases
                .iter()
                .map(|c| (c.name.as_str(), c.outcome))
                .collect::<Vec<_>>(),
            [
                ("a::one", Outcome::Passed),
                ("a::two", Outcome::Failed),
                ("a::three", Outcome::Ignored)
            ]
        );
        assert_eq!(
            cases[1].reason.as_deref(),
            Some("the verifier rejected flannel_encap: R3 min value is outside")
        );
        let mut t = Totals::default();
        for l in OUT.lines() {
            t.add_line(l);
        }
        assert_eq!(
            t,
            Totals {
                passed: 1,
                failed: 1,
                ignored: 1,
                results: 1
            }
        );
    }

    #[test]
    fn a_test_cut_short_is_failed_with_the_reason_given() {
        let cases = parse("running 2 tests\ntest a ... ok\ntest b ... ", "timed out");
        assert_eq!(cases[1].name, "b");
        assert_eq!(cases[1].outcome, Outcome::Failed);
        assert_eq!(cases[1].reason.as_deref(), Some("timed out"));
    }
}
