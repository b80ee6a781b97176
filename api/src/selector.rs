//! The selector expressions of `nodeSelector` and `peerSelector`, in the syntax Calico users
//! already write:
//!
//! ```text
//! all()                               every object
//! has(rack)  !has(rack)               label present / absent
//! zone == "a"   zone != 'a'           equality (a missing label is != everything)
//! zone in {"a", "b"}   zone not in {"c"}
//! name contains "x"  name starts with "x"  name ends with "x"
//! a == "1" && (b == "2" || !has(c))   combinations, with ! binding tighter than &&, && than ||
//! ```
//!
//! An empty selector selects everything, like `all()`.

use std::collections::BTreeMap;
use std::fmt;

/// A parsed selector.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selector {
    All,
    Has(String),
    Eq(String, String),
    Ne(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Contains(String, String),
    StartsWith(String, String),
    EndsWith(String, String),
    Not(Box<Selector>),
    And(Box<Selector>, Box<Selector>),
    Or(Box<Selector>, Box<Selector>),
}

/// Why a selector did not parse: the character offset and what was expected there.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("selector {input:?}: at offset {offset}: {message}")]
pub struct SelectorError {
    pub input: String,
    pub offset: usize,
    pub message: String,
}

impl Selector {
    pub fn parse(input: &str) -> Result<Selector, SelectorError> {
        let mut p = Parser {
            input,
            chars: input.char_indices().collect(),
            pos: 0,
        };
        p.skip_ws();
        if p.at_end() {
            return Ok(Selector::All);
        }
        let sel = p.or()?;
        p.skip_ws();
        if !p.at_end() {
            return Err(p.error("unexpected text after the end of the expression"));
        }
        Ok(sel)
    }

    /// Whether an object with these labels is selected.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        match self {
            Selector::All => true,
            Selector::Has(k) => labels.contains_key(k),
            Selector::Eq(k, v) => labels.get(k) == Some(v),
            Selector::Ne(k, v) => labels.get(k) != Some(v),
            Selector::In(k, vs) => labels.get(k).is_some_and(|l| vs.contains(l)),
            Selector::NotIn(k, vs) => labels.get(k).is_none_or(|l| !vs.contains(l)),
            Selector::Contains(k, v) => labels.get(k).is_some_and(|l| l.contains(v.as_str())),
            Selector::StartsWith(k, v) => labels.get(k).is_some_and(|l| l.starts_with(v.as_str())),
            Selector::EndsWith(k, v) => labels.get(k).is_some_and(|l| l.ends_with(v.as_str())),
            Selector::Not(s) => !s.matches(labels),
            Selector::And(a, b) => a.matches(labels) && b.matches(labels),
            Selector::Or(a, b) => a.matches(labels) || b.matches(labels),
        }
    }
}

fn quote(s: &str) -> String {
    format!("{:?}", s)
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let list = |vs: &[String]| vs.iter().map(|v| quote(v)).collect::<Vec<_>>().join(", ");
        match self {
            Selector::All => f.write_str("all()"),
            Selector::Has(k) => write!(f, "has({k})"),
            Selector::Eq(k, v) => write!(f, "{k} == {}", quote(v)),
            Selector::Ne(k, v) => write!(f, "{k} != {}", quote(v)),
            Selector::In(k, vs) => write!(f, "{k} in {{{}}}", list(vs)),
            Selector::NotIn(k, vs) => write!(f, "{k} not in {{{}}}", list(vs)),
            Selector::Contains(k, v) => write!(f, "{k} contains {}", quote(v)),
            Selector::StartsWith(k, v) => write!(f, "{k} starts with {}", quote(v)),
            Selector::EndsWith(k, v) => write!(f, "{k} ends with {}", quote(v)),
            Selector::Not(s) => write!(f, "!({s})"),
            Selector::And(a, b) => write!(f, "({a} && {b})"),
            Selector::Or(a, b) => write!(f, "({a} || {b})"),
        }
    }
}

struct Parser<'a> {
    input: &'a str,
    chars: Vec<(usize, char)>,
    pos: usize,
}

fn is_label_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '/' | '-')
}

impl Parser<'_> {
    fn at_end(&self) -> bool {
        self.pos >= self.chars.len()
    }

    fn offset(&self) -> usize {
        self.chars
            .get(self.pos)
            .map(|(o, _)| *o)
            .unwrap_or(self.input.len())
    }

    fn peek(&self) -> Option<char> {
        self.chars.get(self.pos).map(|(_, c)| *c)
    }

    fn error(&self, message: &str) -> SelectorError {
        SelectorError {
            input: self.input.to_owned(),
            offset: self.offset(),
            message: message.to_owned(),
        }
    }

    fn skip_ws(&mut self) {
        while self.peek().is_some_and(char::is_whitespace) {
            self.pos += 1;
        }
    }

    /// Consumes `tok` (after white space) if it is next.
    fn eat(&mut self, tok: &str) -> bool {
        self.skip_ws();
        let rest = &self.input[self.offset()..];
        if let Some(after) = rest.strip_prefix(tok) {
            // Keywords must not run on into a label (`input` is not `in`).
            let word = tok.chars().all(|c| c.is_ascii_alphabetic());
            let next = after.chars().next();
            if word && next.is_some_and(is_label_char) {
                return false;
            }
            self.pos += tok.chars().count();
            true
        } else {
            false
        }
    }

    fn expect(&mut self, tok: &str) -> Result<(), SelectorError> {
        if self.eat(tok) {
            Ok(())
        } else {
            Err(self.error(&format!("expected {tok:?}")))
        }
    }

    fn or(&mut self) -> Result<Selector, SelectorError> {
        let mut left = self.and()?;
        while self.eat("||") {
            let right = self.and()?;
            left = Selector::Or(Box::new(left), Box::new(right));
        }
        Ok(left)
    }

    fn and(&mut self) -> Result<Selector, SelectorError> {
        let mut left = self.unary()?;
        while self.eat("&&") {
            let right = self.unary()?;
            left = Selector::And(Box::new(left), Box::new(right));
        }
        Ok(left)
    }

    fn unary(&mut self) -> Result<Selector, SelectorError> {
        self.skip_ws();
        // `!=` never starts an operand, so a leading `!` is always negation.
        if self.eat("!") {
            return Ok(Selector::Not(Box::new(self.unary()?)));
        }
        if self.eat("(") {
            let inner = self.or()?;
            self.expect(")")?;
            return Ok(inner);
        }
        if self.eat("all") {
            self.expect("(")?;
            self.expect(")")?;
            return Ok(Selector::All);
        }
        if self.eat("has") {
            self.expect("(")?;
            let label = self.label()?;
            self.expect(")")?;
            return Ok(Selector::Has(label));
        }
        let label = self.label()?;
        if self.eat("==") {
            return Ok(Selector::Eq(label, self.string()?));
        }
        if self.eat("!=") {
            return Ok(Selector::Ne(label, self.string()?));
        }
        if self.eat("in") {
            return Ok(Selector::In(label, self.set()?));
        }
        if self.eat("not") {
            self.expect("in")?;
            return Ok(Selector::NotIn(label, self.set()?));
        }
        if self.eat("contains") {
            return Ok(Selector::Contains(label, self.string()?));
        }
        if self.eat("starts") {
            self.expect("with")?;
            return Ok(Selector::StartsWith(label, self.string()?));
        }
        if self.eat("ends") {
            self.expect("with")?;
            return Ok(Selector::EndsWith(label, self.string()?));
        }
        Err(self.error(
            "expected an operator after the label: ==, !=, in, not in, contains, starts with, ends with",
        ))
    }

    fn label(&mut self) -> Result<String, SelectorError> {
        self.skip_ws();
        let start = self.pos;
        while self.peek().is_some_and(is_label_char) {
            self.pos += 1;
        }
        if self.pos == start {
            return Err(self
                .error("expected a label name, all(), has(label) or a parenthesised expression"));
        }
        Ok(self.chars[start..self.pos].iter().map(|(_, c)| c).collect())
    }

    fn string(&mut self) -> Result<String, SelectorError> {
        self.skip_ws();
        let q = match self.peek() {
            Some(q @ ('"' | '\'')) => q,
            _ => return Err(self.error("expected a quoted string")),
        };
        self.pos += 1;
        let mut out = String::new();
        loop {
            match self.peek() {
                None => return Err(self.error("unterminated string")),
                Some(c) if c == q => {
                    self.pos += 1;
                    return Ok(out);
                }
                Some(c) => {
                    out.push(c);
                    self.pos += 1;
                }
            }
        }
    }

    fn set(&mut self) -> Result<Vec<String>, SelectorError> {
        self.expect("{")?;
        let mut out = Vec::new();
        if self.eat("}") {
            return Ok(out);
        }
        loop {
            out.push(self.string()?);
            if self.eat("}") {
                return Ok(out);
            }
            self.expect(",")?;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn evaluates_the_calico_forms() {
        let l = labels(&[
            ("zone", "a"),
            ("kubernetes.io/os", "linux"),
            ("rack", "r12"),
        ]);
        let cases = [
            ("", true),
            ("all()", true),
            ("has(zone)", true),
            ("!has(zone)", false),
            ("has(missing)", false),
            ("zone == 'a'", true),
            ("zone == \"b\"", false),
            ("zone != 'b'", true),
            ("missing != 'b'", true),
            ("zone in {'a', 'b'}", true),
            ("zone not in {'a'}", false),
            ("missing not in {'a'}", true),
            ("missing in {'a'}", false),
            ("rack starts with 'r1'", true),
            ("rack ends with '2'", true),
            ("rack contains '1'", true),
            ("kubernetes.io/os == 'linux' && zone == 'a'", true),
            ("zone == 'b' || rack == 'r12'", true),
            ("!(zone == 'a' && rack == 'r12')", false),
            ("zone == 'b' || zone == 'c' && has(rack)", false),
            ("(zone == 'b' || zone == 'a') && has(rack)", true),
            ("zone in {}", false),
        ];
        for (sel, want) in cases {
            let s = Selector::parse(sel).unwrap_or_else(|e| panic!("{sel}: {e}"));
            assert_eq!(s.matches(&l), want, "{sel}");
            // The displayed form parses back to the same meaning.
            let again = Selector::parse(&s.to_string()).unwrap();
            assert_eq!(again.matches(&l), want, "{sel} displayed as {s}");
        }
    }

    #[test]
    fn rejects_bad_syntax_with_an_offset() {
        for (sel, offset) in [
            ("zone = 'a'", 5),
            ("zone == a", 8),
            ("has(zone", 8),
            ("zone == 'a' &&", 14),
            ("zone in {'a' 'b'}", 13),
            ("zone == 'a", 10),
            ("all(", 4),
            ("zone == 'a' junk", 12),
            ("&& zone == 'a'", 0),
            ("zone input {'a'}", 5),
        ] {
            let err = Selector::parse(sel).expect_err(sel);
            assert_eq!(err.offset, offset, "{sel}: {err}");
        }
    }
}
