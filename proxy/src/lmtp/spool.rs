//! A message spooled once, in memory up to a limit and in an unnamed
//! temporary file above it (nothing is left behind by a crash), then read
//! by every backend delivery at once.

use std::io;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Arc;

use tokio::io::{AsyncWrite, AsyncWriteExt};

/// Bytes read from the spool file per step.
const READ_CHUNK: usize = 64 * 1024;

/// A message being written, then shared for reading.
pub struct Spool {
    memory: Vec<u8>,
    memory_limit: usize,
    file: Option<Arc<std::fs::File>>,
    dir: Option<PathBuf>,
    len: u64,
}

impl Spool {
    /// An empty spool keeping up to `memory_limit` bytes in memory; above
    /// that, a file in `dir` (the system's temporary directory if unset).
    pub fn new(memory_limit: usize, dir: Option<PathBuf>) -> Spool {
        Spool {
            memory: Vec::new(),
            memory_limit,
            file: None,
            dir,
            len: 0,
        }
    }

    /// Bytes written so far.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether nothing was written.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Appends `bytes`.
    pub async fn write(&mut self, bytes: &[u8]) -> io::Result<()> {
        if self.file.is_none() && self.memory.len() + bytes.len() > self.memory_limit {
            let dir = self.dir.clone();
            let memory = std::mem::take(&mut self.memory);
            let file = tokio::task::spawn_blocking(move || -> io::Result<std::fs::File> {
                let mut f = match dir {
                    Some(d) => tempfile::tempfile_in(d)?,
                    None => tempfile::tempfile()?,
                };
                io::Write::write_all(&mut f, &memory)?;
                Ok(f)
            })
            .await
            .map_err(io::Error::other)??;
            self.file = Some(Arc::new(file));
            metrics::counter!("corvid_proxy_lmtp_spool_files_total").increment(1);
        }
        match &self.file {
            None => self.memory.extend_from_slice(bytes),
            Some(f) => {
                let (f, data, at) = (f.clone(), bytes.to_vec(), self.len);
                tokio::task::spawn_blocking(move || f.write_all_at(&data, at))
                    .await
                    .map_err(io::Error::other)??;
            }
        }
        self.len += bytes.len() as u64;
        Ok(())
    }

    /// Empties the spool for the next message.
    pub fn clear(&mut self) {
        self.memory.clear();
        if self.memory.capacity() > self.memory_limit.min(1024 * 1024) {
            self.memory = Vec::new();
        }
        self.file = None;
        self.len = 0;
    }

    /// A read-only view for the deliveries (cheap to clone). The message
    /// held in memory moves into it without a copy; the spool is then
    /// only good for [`Spool::clear`].
    pub fn reader(&mut self) -> SpoolReader {
        SpoolReader {
            memory: bytes::Bytes::from(std::mem::take(&mut self.memory)),
            file: self.file.clone(),
            len: self.len,
        }
    }
}

/// What every backend delivery reads: the whole spooled message.
#[derive(Clone)]
pub struct SpoolReader {
    memory: bytes::Bytes,
    file: Option<Arc<std::fs::File>>,
    len: u64,
}

impl SpoolReader {
    /// Copies the whole message to `out`, in chunks.
    pub async fn copy_to<W: AsyncWrite + Unpin>(&self, out: &mut W) -> io::Result<()> {
        match &self.file {
            None => out.write_all(&self.memory).await,
            Some(f) => {
                let mut at = 0u64;
                while at < self.len {
                    let n = ((self.len - at) as usize).min(READ_CHUNK);
                    let f = f.clone();
                    let buf = tokio::task::spawn_blocking(move || -> io::Result<Vec<u8>> {
                        let mut buf = vec![0u8; n];
                        f.read_exact_at(&mut buf, at)?;
                        Ok(buf)
                    })
                    .await
                    .map_err(io::Error::other)??;
                    out.write_all(&buf).await?;
                    at += n as u64;
                }
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_big_message_goes_to_a_file_and_reads_back_whole() {
        let dir = tempfile::tempdir().unwrap();
        let mut spool = Spool::new(1000, Some(dir.path().to_path_buf()));
        let mut want = Vec::new();
        for i in 0..500u32 {
            let chunk = format!("line {i} of the message\r\n");
            spool.write(chunk.as_bytes()).await.unwrap();
            want.extend_from_slice(chunk.as_bytes());
        }
        assert!(spool.file.is_some() && spool.memory.is_empty());
        // The file is unnamed: nothing is visible in the directory.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        let mut out = Vec::new();
        spool.reader().copy_to(&mut out).await.unwrap();
        assert_eq!(out, want);
        spool.clear();
        spool.write(b"small").await.unwrap();
        let mut out = Vec::new();
        spool.reader().copy_to(&mut out).await.unwrap();
        assert_eq!(out, b"small");
    }
}
