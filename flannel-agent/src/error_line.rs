//! Errors as operators read them: one line, each cause once.
//!
//! Our typed errors (and several of our dependencies') put their cause in their own message
//! *and* expose it as `source()`, so anyhow's `{:#}` would print it twice ("lease not found:
//! lease not found"). This walks the chain and leaves out what the line already says.

/// `err` and its causes as "outer: cause: root", skipping causes already contained in the line.
pub fn one_line(err: &(dyn std::error::Error + 'static)) -> String {
    let mut texts = vec![err.to_string()];
    let mut cause = err.source();
    while let Some(c) = cause {
        texts.push(c.to_string());
        cause = c.source();
    }
    one_line_texts(&texts)
}

/// Messages of a chain (outermost first) as one line, each cause once.
pub fn one_line_texts(texts: &[String]) -> String {
    let mut line = String::new();
    for t in texts {
        if t.is_empty() || line.contains(t.as_str()) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(t);
    }
    line.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// [`one_line`] for anyhow errors (context layers included).
pub fn anyhow_line(err: &anyhow::Error) -> String {
    one_line(err.as_ref())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("etcd: {0}")]
    struct Outer(#[from] Inner);

    #[derive(Debug, thiserror::Error)]
    #[error("lease keep alive error: lease not found")]
    struct Inner;

    #[test]
    fn causes_already_in_the_message_are_not_repeated() {
        assert_eq!(
            one_line(&Outer(Inner)),
            "etcd: lease keep alive error: lease not found"
        );
    }

    #[test]
    fn context_layers_are_kept_in_order() {
        let e = anyhow::Error::new(Inner).context("renewing 10.244.1.0/24");
        assert_eq!(
            anyhow_line(&e),
            "renewing 10.244.1.0/24: lease keep alive error: lease not found"
        );
    }

    #[test]
    fn new_information_in_a_cause_is_appended() {
        let io = std::io::Error::other(
            "connection refused
(os error 111)",
        );
        let e = anyhow::Error::new(io).context("connecting to http://192.0.2.1:2379");
        assert_eq!(
            anyhow_line(&e),
            "connecting to http://192.0.2.1:2379: connection refused (os error 111)"
        );
    }
}
