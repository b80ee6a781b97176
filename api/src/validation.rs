//! Validation errors that a user can act on: each names the field path, the bad value and
//! what is wrong with it.

use std::fmt;

/// One problem with one field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    /// JSON path of the field, e.g. `spec.blockSize` or `spec.communities[2].value`.
    pub path: String,
    /// The offending value as the user wrote it.
    pub value: String,
    /// What is wrong and, where it helps, what would be right.
    pub reason: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {:?}: {}", self.path, self.value, self.reason)
    }
}

/// All problems found in one object. Never empty when returned as an error.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ValidationErrors(pub Vec<FieldError>);

impl ValidationErrors {
    pub fn new() -> ValidationErrors {
        ValidationErrors(Vec::new())
    }

    pub fn single(
        path: impl Into<String>,
        value: impl ToString,
        reason: impl Into<String>,
    ) -> ValidationErrors {
        let mut e = ValidationErrors::new();
        e.add(path, value, reason);
        e
    }

    pub fn add(
        &mut self,
        path: impl Into<String>,
        value: impl ToString,
        reason: impl Into<String>,
    ) {
        self.0.push(FieldError {
            path: path.into(),
            value: value.to_string(),
            reason: reason.into(),
        });
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn errors(&self) -> &[FieldError] {
        &self.0
    }

    /// True when some error is about `path`.
    pub fn has(&self, path: &str) -> bool {
        self.0.iter().any(|e| e.path == path)
    }

    /// `Ok(())` when nothing was added, else `Err(self)`.
    pub fn into_result(self) -> Result<(), ValidationErrors> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(self)
        }
    }
}

impl fmt::Display for ValidationErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ValidationErrors {}
