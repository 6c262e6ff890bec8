//! The store's file operations behind one trait, [`Fs`], and the durable steps built on it.
//!
//! Every file the store creates, writes, syncs, renames or removes goes through an [`Fs`]:
//! the broker uses [`OsFs`] (the operating system), the crash tests a simulated disk that
//! keeps only what was synced (`store::simdisk`). Files are `Arc<dyn FileIo>` so a segment's
//! one handle is shared by its writer and every reader, as with `Arc<File>` before.
//!
//! POSIX makes a new, renamed or removed name durable only once its *directory* is synced,
//! and a file's bytes only once the file is synced. [`sync_parent`] and [`write_durably`]
//! are those two rules in one place, so each store change that is acknowledged says which
//! one it relies on.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::error::StoreError;

/// Shared handle on the file system a store lives on.
pub type FsRef = Arc<dyn Fs>;

/// How [`Fs::open`] opens a file; every mode reads and writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Open {
    /// The file must exist.
    Existing,
    /// Opened if it exists, created empty otherwise; never truncated.
    OrCreate,
    /// Created; fails with `AlreadyExists` if it exists.
    CreateNew,
    /// Created, or emptied if it exists.
    Truncate,
}

/// One entry of a directory listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirEntry {
    /// The entry's name (entries whose name is not UTF-8 are left out: the store never
    /// makes such names).
    pub name: String,
    /// Whether it is a directory.
    pub is_dir: bool,
}

/// The directory operations the store needs.
pub trait Fs: Send + Sync + fmt::Debug {
    /// Opens a file for positional reads and writes.
    fn open(&self, path: &Path, how: Open) -> io::Result<Arc<dyn FileIo>>;
    /// The whole content of a file.
    fn read(&self, path: &Path) -> io::Result<Vec<u8>>;
    /// Creates a directory and any missing parents.
    fn create_dir_all(&self, path: &Path) -> io::Result<()>;
    /// The entries of a directory, in no particular order.
    fn list(&self, dir: &Path) -> io::Result<Vec<DirEntry>>;
    /// Renames a file or directory, replacing a file at `to`.
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;
    /// Removes a file.
    fn remove_file(&self, path: &Path) -> io::Result<()>;
    /// Removes a directory and everything in it.
    fn remove_dir_all(&self, path: &Path) -> io::Result<()>;
    /// Makes the directory's entries (names created, renamed, removed) durable.
    fn sync_dir(&self, dir: &Path) -> io::Result<()>;
}

/// An open file: positional I/O only, so concurrent readers and the writer never share a
/// cursor.
pub trait FileIo: Send + Sync + fmt::Debug {
    /// Fills `buf` from position `at`; `UnexpectedEof` if the file ends first.
    fn read_exact_at(&self, buf: &mut [u8], at: u64) -> io::Result<()>;
    /// Writes all of `data` at position `at`.
    fn write_all_at(&self, data: &[u8], at: u64) -> io::Result<()>;
    /// Cuts or extends the file to `len` bytes.
    fn set_len(&self, len: u64) -> io::Result<()>;
    /// The file's length.
    fn len(&self) -> io::Result<u64>;
    /// Makes the file's bytes and length durable (fdatasync).
    fn sync_data(&self) -> io::Result<()>;
}

/// The operating system's file system.
#[derive(Debug, Clone, Copy, Default)]
pub struct OsFs;

impl OsFs {
    /// A shared handle on it.
    pub fn shared() -> FsRef {
        Arc::new(OsFs)
    }
}

impl Fs for OsFs {
    fn open(&self, path: &Path, how: Open) -> io::Result<Arc<dyn FileIo>> {
        let mut options = OpenOptions::new();
        options.read(true).write(true);
        match how {
            Open::Existing => {}
            Open::OrCreate => {
                options.create(true).truncate(false);
            }
            Open::CreateNew => {
                options.create_new(true);
            }
            Open::Truncate => {
                options.create(true).truncate(true);
            }
        }
        Ok(Arc::new(options.open(path)?))
    }

    fn read(&self, path: &Path) -> io::Result<Vec<u8>> {
        std::fs::read(path)
    }

    fn create_dir_all(&self, path: &Path) -> io::Result<()> {
        std::fs::create_dir_all(path)
    }

    fn list(&self, dir: &Path) -> io::Result<Vec<DirEntry>> {
        let mut out = Vec::new();
        for entry in std::fs::read_dir(dir)? {
            let entry = entry?;
            let Ok(name) = entry.file_name().into_string() else {
                continue;
            };
            out.push(DirEntry {
                name,
                is_dir: entry.file_type()?.is_dir(),
            });
        }
        Ok(out)
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        std::fs::rename(from, to)
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        std::fs::remove_file(path)
    }

    fn remove_dir_all(&self, path: &Path) -> io::Result<()> {
        std::fs::remove_dir_all(path)
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        File::open(dir)?.sync_all()
    }
}

impl FileIo for File {
    fn read_exact_at(&self, buf: &mut [u8], at: u64) -> io::Result<()> {
        FileExt::read_exact_at(self, buf, at)
    }

    fn write_all_at(&self, data: &[u8], at: u64) -> io::Result<()> {
        FileExt::write_all_at(self, data, at)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        File::set_len(self, len)
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.metadata()?.len())
    }

    fn sync_data(&self) -> io::Result<()> {
        File::sync_data(self)
    }
}

/// The directory holding `path` (`.` for a bare name).
pub(crate) fn parent(path: &Path) -> &Path {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    }
}

/// Syncs the directory holding `path`, so that its creation, rename or removal is durable.
pub(crate) fn sync_parent(fs: &dyn Fs, path: &Path) -> Result<(), StoreError> {
    let dir = parent(path);
    fs.sync_dir(dir).map_err(StoreError::io(dir))
}

/// Replaces (or creates) the file at `path` with `bytes` so that a crash leaves either the
/// old content or the new, never a mix: writes a temporary file beside it, syncs it, renames
/// it over `path` and syncs the directory. The temporary name starts with a dot, which no
/// MQ or group name may.
pub(crate) fn write_durably(fs: &dyn Fs, path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    let tmp = temp_path(path);
    let written = (|| {
        let file = fs.open(&tmp, Open::Truncate)?;
        file.write_all_at(bytes, 0)?;
        file.sync_data()
    })();
    if let Err(e) = written {
        // Best effort: a leftover temporary file is ignored by every reader.
        let _ = fs.remove_file(&tmp);
        return Err(StoreError::io(&tmp)(e));
    }
    fs.rename(&tmp, path).map_err(StoreError::io(path))?;
    sync_parent(fs, path)
}

fn temp_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy())
        .unwrap_or_default();
    parent(path).join(format!(".{name}.tmp"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn os_fs_round_trips_and_replaces_durably() {
        let tmp = tempfile::tempdir().unwrap();
        let fs = OsFs::shared();
        let dir = tmp.path().join("a/b");
        fs.create_dir_all(&dir).unwrap();
        let path = dir.join("x");
        write_durably(&*fs, &path, b"one").unwrap();
        write_durably(&*fs, &path, b"two!").unwrap();
        assert_eq!(fs.read(&path).unwrap(), b"two!");
        let names: Vec<_> = fs.list(&dir).unwrap().into_iter().map(|e| e.name).collect();
        assert_eq!(names, ["x"], "no temporary file left");

        let file = fs.open(&path, Open::Existing).unwrap();
        file.write_all_at(b"ab", 4).unwrap();
        let mut buf = [0u8; 6];
        file.read_exact_at(&mut buf, 0).unwrap();
        assert_eq!(&buf, b"two!ab");
        assert_eq!(file.len().unwrap(), 6);
        file.set_len(2).unwrap();
        file.sync_data().unwrap();
        assert_eq!(fs.read(&path).unwrap(), b"tw");
        let err = fs.open(&path, Open::CreateNew).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AlreadyExists);
    }
}
