//! `virt-xml-validate` (Debian `libvirt-clients` + `libxml2-utils`): checks a document against
//! libvirt's own RelaxNG schema. The executor runs it on every domain XML it generates when it is
//! given a validator (tests always; production optionally), so a schema slip fails loudly before
//! libvirt sees the document.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};

use thiserror::Error;

#[derive(Debug, Error)]
pub enum ValidationError {
    #[error("could not run {program}: {source}")]
    Spawn {
        program: String,
        source: std::io::Error,
    },
    #[error("libvirt schema rejected the {schema} XML: {output}")]
    Rejected { schema: String, output: String },
}

/// Runs `virt-xml-validate - SCHEMA` with the document on stdin.
#[derive(Debug)]
pub struct XmlValidator {
    program: PathBuf,
    validated: AtomicU64,
}

impl Default for XmlValidator {
    fn default() -> Self {
        Self::new()
    }
}

impl XmlValidator {
    pub fn new() -> Self {
        Self::with_program("virt-xml-validate")
    }
    pub fn with_program(program: impl Into<PathBuf>) -> Self {
        Self {
            program: program.into(),
            validated: AtomicU64::new(0),
        }
    }

    /// How many documents passed so far.
    pub fn validated(&self) -> u64 {
        self.validated.load(Ordering::Relaxed)
    }

    /// Validates a `<domain>` document. Blocking (runs a process).
    pub fn validate_domain(&self, xml: &str) -> Result<(), ValidationError> {
        self.validate(xml, "domain")
    }

    /// Validates `xml` against libvirt's schema `schema` (`domain`, `nodedev`, …). Blocking.
    pub fn validate(&self, xml: &str, schema: &str) -> Result<(), ValidationError> {
        let spawn_err = |source| ValidationError::Spawn {
            program: self.program.display().to_string(),
            source,
        };
        let mut child = Command::new(&self.program)
            .arg("-")
            .arg(schema)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(spawn_err)?;
        if let Some(mut stdin) = child.stdin.take() {
            match stdin.write_all(xml.as_bytes()) {
                // The validator exited without reading all of it: its exit status says why.
                Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {}
                r => r.map_err(spawn_err)?,
            }
        }
        let out = child.wait_with_output().map_err(spawn_err)?;
        if out.status.success() {
            self.validated.fetch_add(1, Ordering::Relaxed);
            Ok(())
        } else {
            let mut output = String::from_utf8_lossy(&out.stderr).trim().to_owned();
            let stdout = String::from_utf8_lossy(&out.stdout);
            if !stdout.trim().is_empty() {
                output.push_str(" | ");
                output.push_str(stdout.trim());
            }
            Err(ValidationError::Rejected {
                schema: schema.to_owned(),
                output: output.replace('\n', " / "),
            })
        }
    }
}
