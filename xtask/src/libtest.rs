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
    // The `failures:` block that only lists names (the one before `test result:`), not the
    // one with each failure's output (which may hold indented lines of its own).
    let mut in_failures = false;
    let mut failure_names: Vec<String> = Vec::new();
    let mut listed_failed: Vec<String> = Vec::new();
    for line in output.lines() {
        if let Some(rest) = line.strip_prefix("test ") {
            if let Some((name, after)) = rest.split_once(" ... ") {
                let name = name.to_owned();
                match Outcome::parse(after.trim()) {
                    Some(o) => push(&mut cases, name, o),
                    None => pending = Some(name),
                }
                in_failures = false;
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
            in_failures = true;
            failure_names.clear();
        } else if line.starts_with("test result:") {
            listed_failed.append(&mut failure_names);
            in_failures = false;
        } else if in_failures {
            let name = line.trim();
            if line.starts_with("    ") && !name.is_empty() && !name.contains(char::is_whitespace) {
                failure_names.push(name.to_owned());
            } else if !name.is_empty() {
                // Output of a failure, not the list of names.
                in_failures = false;
                failure_names.clear();
            }
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

/// `name`'s panic message (from its `---- NAME stdout ----` section), summarised.
fn panic_message(output: &str, name: &str) -> Option<String> {
    let header = format!("---- {name} stdout ----");
    let section = &output[output.find(&header)? + header.len()..];
    let mut lines = section.lines().skip_while(|l| !l.contains("panicked at"));
    let at = lines.next()?;
    // Since Rust 1.73: `thread 'x' panicked at file:line:col:` then the message, which ends
    // where the backtrace note, the backtrace or the next test's section begins.
    let mut message: Vec<&str> = if at.trim_end().ends_with(':') {
        Vec::new()
    } else {
        vec![at.split_once("panicked at ").map_or(at, |(_, m)| m)]
    };
    message.extend(lines.take_while(|l| {
        !l.starts_with("note: run with")
            && !l.starts_with("stack backtrace:")
            && !l.starts_with("---- ")
            && !l.starts_with("failures:")
    }));
    summarize(&message)
}

/// One line from a panic message: its first line, the first ERROR line of an agent log quoted
/// in it, and what the verifier said last if a verifier log is in it (the line before
/// `verification time`).
pub fn summarize(message: &[&str]) -> Option<String> {
    let mut lines = message.iter().map(|l| l.trim()).filter(|l| !l.is_empty());
    let first = lines.next()?;
    let mut out = truncate(first, 200);
    if let Some(err) = message
        .iter()
        .find_map(|l| l.split_once(" ERROR ").map(|(_, e)| e.trim()))
    {
        out.push_str(" | ");
        out.push_str(&truncate(err, 200));
    }
    let all = message.join(" ");
    if let Some(at) = all.find("verification time") {
        let before: String = all[..at].split_whitespace().collect::<Vec<_>>().join(" ");
        let tail: String = before
            .chars()
            .rev()
            .take(200)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
        out.push_str(" | verifier: ...");
        out.push_str(&tail);
    }
    Some(out)
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
stack backtrace:
   0: std::panicking::begin_panic
             at /rustc/library/std/src/panicking.rs:1:1
    indented_output_of_the_test


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
        assert_eq!(cases[0].reason, None);
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
    fn a_verifier_verdict_and_an_agent_error_are_kept() {
        let msg = [
            "flanneld exited (exit status: 1) before ready:",
            "[2026-12-07T19:01:26Z INFO  flannel_agent::startup] using interface eth0",
            "[2026-12-07T19:01:32Z ERROR flanneld] starting the udp backend: program flannel_encap: rejected",
            "1074: (85) call bpf_skb_load_bytes#26 invalid access to map value",
            "R3 min value is outside of the allowed memory range",
            "verification time 239042 usec",
        ];
        let s = summarize(&msg).unwrap();
        assert!(s.starts_with("flanneld exited (exit status: 1) before ready: | flanneld] starting the udp backend: program flannel_encap: rejected | verifier: ..."), "{s}");
        assert!(
            s.ends_with("R3 min value is outside of the allowed memory range"),
            "{s}"
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
