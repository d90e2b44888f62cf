// TensorBoard event files, written without TensorFlow or libprotobuf.
//
// File format: a sequence of TFRecords, each
//   uint64 length (little-endian) | uint32 masked CRC-32C of those 8 bytes | data | uint32 masked CRC-32C of data
// where masked(crc) = ((crc >> 15) | (crc << 17)) + 0xa282ead8 and CRC-32C is the Castagnoli CRC
// (reflected polynomial 0x82F63B78, as iSCSI, RFC 3720). Each record's data is a protobuf
// `tensorflow.Event`, of which these fields are written (by hand: a few varints, one fixed64, one
// fixed32 and length-delimited bytes):
//   Event      { double wall_time = 1; int64 step = 2; string file_version = 3; Summary summary = 5;
//                SessionLog session_log = 7; }   (file_version, summary and session_log: one per event)
//   SessionLog { enum SessionStatus status = 1; }   (START = 1)
//   Summary    { repeated Value value = 1; }
//   Value      { string tag = 1; float simple_value = 2; Image image = 4; }
//   Image      { int32 height = 1; int32 width = 2; int32 colorspace = 3; bytes encoded_image_string = 4; }
// The first record of every file is the `file_version` "brain.Event:2".
//
// One run folder, several starts: every start (fresh or resumed at step S) opens a new file
// `events.out.tfevents.<unix time>.<hostname>` (the time raised past every existing file's, so
// name order, which is the order TensorBoard reads a run's files in, is start order), writes a
// SessionLog START at step S + 1 and then the records of steps S + 1 onwards. Before that,
// truncate_events cuts every existing events file of the folder back to the records of steps <= S,
// just as metrics.jsonl is cut, so records an interrupted run wrote after its last checkpoint never
// show beside the ones the resumed run writes again. The START event covers a TensorBoard that
// already read those records while it ran: its EventAccumulator (file_version 2) drops everything
// at steps >= the START's step on seeing it; TensorBoard's data server (which ignores SessionLog)
// drops a tag's later points when that tag's steps go back.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace mae {

namespace tb {

/// CRC-32C (Castagnoli) of `size` bytes, continuing from `crc` (0 for a new checksum).
uint32_t crc32c(const void* data, size_t size, uint32_t crc = 0);

/// TFRecord's masked CRC-32C: ((c >> 15) | (c << 17)) + 0xa282ead8 with c = crc32c(data).
uint32_t masked_crc32c(const void* data, size_t size);

/// One TFRecord around `data`: length, its masked CRC, data, the data's masked CRC.
std::string frame_record(const std::string& data);

/// The records at the start of `bytes`, up to the first one that is cut short or fails a CRC;
/// `valid_end`, when given, receives the byte offset just after the last whole record.
std::vector<std::string> parse_records(const std::string& bytes, size_t* valid_end = nullptr);

/// One value of an image summary.
struct ImageValue {
  int64_t height = 0, width = 0, colorspace = 0;  ///< colorspace 1 = grey, 3 = RGB
  std::string encoded;                            ///< PNG bytes
};

/// One Summary.Value: a scalar or an image.
struct SummaryValue {
  std::string tag;
  std::optional<float> simple_value;
  std::optional<ImageValue> image;
};

/// The fields of an Event this writer uses (others are skipped when reading).
struct Event {
  double wall_time = 0.0;
  int64_t step = 0;
  std::string file_version;           ///< "" when absent
  std::optional<int> session_status;  ///< SessionLog.status when a session_log is present
  std::vector<SummaryValue> summary;  ///< Summary.value
  bool has_summary = false;           ///< a summary field was present (even if empty)
};

/// The protobuf encoding of `event` (proto3: fields at their default value are not written).
std::string encode_event(const Event& event);

/// Decodes an Event; nullopt when `data` is not a well-formed protobuf message.
std::optional<Event> decode_event(const std::string& data);

}  // namespace tb

/// TensorBoard tag of a metrics.jsonl field: "val_<x>" -> "val/<x>", "probe_<x>" -> "probe/<x>",
/// anything else "train/<key>" (loss -> train/loss, lr -> train/lr, data_wait_s -> train/data_wait_s).
std::string scalar_tag(const std::string& key);

/// The scalars of one metrics.jsonl record: every field holding a finite number except "step"
/// (null fields such as a val_loss of a step without validation are left out), tagged by
/// scalar_tag, in the record's key order.
std::vector<std::pair<std::string, float>> record_scalars(const nlohmann::json& record);

/// What truncate_events did.
struct EventsTruncation {
  int64_t records_removed = 0;             ///< records after the kept step (or damaged) cut from files
  std::vector<std::string> files_removed;  ///< files left without any summary, deleted
};

/// Cuts every `events.out.tfevents.*` file directly in `dir` back to its records of steps <=
/// `keep_step` (and before any damaged record: a crash cuts the last one short), in place, and
/// deletes a file that keeps no summary at all. A run folder's files are written in step order, so
/// everything from the first record past `keep_step` on goes. IoError naming the file when one
/// cannot be read, cut or deleted.
EventsTruncation truncate_events(const std::string& dir, int64_t keep_step);

/// Writes one events file; see the file comment. Not thread-safe.
class EventWriter {
 public:
  /// Creates `dir`/events.out.tfevents.<unix time>.<hostname> (refusing to reuse a name) and writes
  /// the file_version record and a SessionLog START at `start_step`. IoError naming the file.
  EventWriter(const std::string& dir, int64_t start_step);
  ~EventWriter();
  EventWriter(const EventWriter&) = delete;
  EventWriter& operator=(const EventWriter&) = delete;

  /// One Event with a simple_value per scalar, at `step`; nothing when `values` is empty.
  void write_scalars(int64_t step, const std::vector<std::pair<std::string, float>>& values);

  /// One Event with an image summary `tag` at `step`: `image` uint8 (H, W, 3) RGB or (H, W) /
  /// (H, W, 1) grey, PNG-encoded.
  void write_image(int64_t step, const std::string& tag, const at::Tensor& image);

  /// fsync: what was written is on disk (called at every checkpoint).
  void sync();

  /// The file's path.
  const std::string& path() const { return path_; }

 private:
  void write_event(const tb::Event& event);

  std::string path_;
  int fd_ = -1;
};

}  // namespace mae
