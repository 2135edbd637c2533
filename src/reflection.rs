//! gRPC server reflection (`grpc.reflection.v1` and `v1alpha`), as
//! `reflection.proto` specifies it, over the encoded descriptor sets the
//! server is built from.
//!
//! tonic-reflection's server ended the whole stream with NOT_FOUND on a
//! failed look-up, and with OK when a request did not decode. Here:
//!
//! - every request is answered on the open stream: a look-up that fails is
//!   an `ErrorResponse` (NOT_FOUND, or INVALID_ARGUMENT for a request
//!   without `message_request`) and the stream stays open for more;
//! - a request that cannot be read ends the call with its status
//!   (INTERNAL for bytes that do not decode), saying which request;
//! - the stream ends with OK when the client closes its side, and with
//!   UNAVAILABLE when the server shuts down, like every stream.
//!
//! Files are served as the bytes they were registered with (never decoded
//! and re-encoded, so no option is lost). A file answer carries the file
//! asked for, then those of its transitive dependencies not yet sent on
//! this stream (reflection.proto allows leaving those out); a client may
//! still ask for each dependency by name, as grpcurl does.
//!
//! Only tonic-reflection's generated types and server traits are used.

use std::{
    collections::{HashMap, HashSet},
    pin::Pin,
    sync::Arc,
};

use bytes::Bytes;
use prost::Message;
use prost_types::{DescriptorProto, EnumDescriptorProto, FieldDescriptorProto};
use tonic::{Code, Status, Streaming};

use crate::{rpc::shutting_down, shutdown::Shutdown};

/// Why the reflection index could not be built from the descriptor sets.
#[derive(Debug, thiserror::Error)]
pub enum ReflectionError {
    /// A descriptor set, or a file in it, does not decode.
    #[error("a file descriptor set does not decode: {0}")]
    Decode(prost::DecodeError),
    /// A file descriptor has no name.
    #[error("a file descriptor has no name")]
    Unnamed,
}

// The cause is in the message, so it is not also a `source()`.
impl From<prost::DecodeError> for ReflectionError {
    fn from(err: prost::DecodeError) -> Self {
        ReflectionError::Decode(err)
    }
}

/// An encoded `FileDescriptorSet` with each file left as its bytes.
#[derive(Clone, PartialEq, Message)]
struct RawFileSet {
    #[prost(bytes = "bytes", repeated, tag = "1")]
    file: Vec<Bytes>,
}

/// One registered file.
#[derive(Debug)]
struct File {
    /// As registered.
    raw: Bytes,
    /// Names of the files it imports.
    dependencies: Vec<String>,
}

/// Everything reflection can be asked about.
#[derive(Debug, Default)]
struct Index {
    /// Fully-qualified service names, in registration order.
    services: Vec<String>,
    /// Files by name.
    files: HashMap<String, File>,
    /// Fully-qualified symbol → name of the file that declares it.
    symbols: HashMap<String, String>,
    /// Fully-qualified message types (what extensions can extend).
    messages: HashSet<String>,
    /// (extended message type, field number) → file declaring the extension.
    extensions: HashMap<(String, i32), String>,
}

impl Index {
    fn register(&mut self, set: &[u8]) -> Result<(), ReflectionError> {
        for raw in RawFileSet::decode(set)?.file {
            let file = prost_types::FileDescriptorProto::decode(raw.clone())?;
            let name = file.name.clone().ok_or(ReflectionError::Unnamed)?;
            // The first registration of a file name wins.
            if self.files.contains_key(&name) {
                continue;
            }
            let package = file.package().to_owned();
            for message in &file.message_type {
                self.message(&name, &package, message);
            }
            for en in &file.enum_type {
                self.enumeration(&name, &package, en);
            }
            for extension in &file.extension {
                self.extension(&name, &package, extension);
            }
            for service in &file.service {
                let service_name = qualified(&package, service.name());
                for method in &service.method {
                    self.symbol(&name, qualified(&service_name, method.name()));
                }
                if !self.services.contains(&service_name) {
                    self.services.push(service_name.clone());
                }
                self.symbol(&name, service_name);
            }
            self.files.insert(
                name,
                File {
                    raw,
                    dependencies: file.dependency,
                },
            );
        }
        Ok(())
    }

    fn symbol(&mut self, file: &str, symbol: String) {
        self.symbols
            .entry(symbol)
            .or_insert_with(|| file.to_owned());
    }

    fn message(&mut self, file: &str, scope: &str, message: &DescriptorProto) {
        let name = qualified(scope, message.name());
        for field in &message.field {
            self.symbol(file, qualified(&name, field.name()));
        }
        for oneof in &message.oneof_decl {
            self.symbol(file, qualified(&name, oneof.name()));
        }
        for nested in &message.nested_type {
            self.message(file, &name, nested);
        }
        for en in &message.enum_type {
            self.enumeration(file, &name, en);
        }
        for extension in &message.extension {
            self.extension(file, &name, extension);
        }
        self.messages.insert(name.clone());
        self.symbol(file, name);
    }

    fn enumeration(&mut self, file: &str, scope: &str, en: &EnumDescriptorProto) {
        // Enum values are scoped as siblings of their enum (protobuf's rule).
        for value in &en.value {
            self.symbol(file, qualified(scope, value.name()));
        }
        self.symbol(file, qualified(scope, en.name()));
    }

    fn extension(&mut self, file: &str, scope: &str, extension: &FieldDescriptorProto) {
        let extended = extension.extendee().trim_start_matches('.').to_owned();
        self.extensions
            .entry((extended, extension.number()))
            .or_insert_with(|| file.to_owned());
        self.symbol(file, qualified(scope, extension.name()));
    }

    /// The answer to `question`; `sent` holds the files already sent on
    /// this stream.
    fn answer(&self, question: Question, sent: &mut HashSet<String>) -> Answer {
        match question {
            Question::ListServices => Answer::Services(self.services.clone()),
            Question::FileByFilename(name) => self.files_from(&name, sent).unwrap_or_else(|| {
                Answer::Error(Code::NotFound, format!("no file named '{name}' is known"))
            }),
            Question::FileContainingSymbol(symbol) => self
                .symbols
                .get(&symbol)
                .and_then(|file| self.files_from(file, sent))
                .unwrap_or_else(|| {
                    Answer::Error(Code::NotFound, format!("no symbol '{symbol}' is known"))
                }),
            Question::FileContainingExtension(extended, number) => self
                .extensions
                .get(&(extended.clone(), number))
                .and_then(|file| self.files_from(file, sent))
                .unwrap_or_else(|| {
                    Answer::Error(
                        Code::NotFound,
                        format!("no extension {number} of '{extended}' is known"),
                    )
                }),
            Question::AllExtensionNumbersOfType(extended) => {
                if !self.messages.contains(&extended) {
                    return Answer::Error(
                        Code::NotFound,
                        format!("no message type '{extended}' is known"),
                    );
                }
                let mut numbers: Vec<i32> = self
                    .extensions
                    .keys()
                    .filter(|(of, _)| *of == extended)
                    .map(|&(_, number)| number)
                    .collect();
                numbers.sort_unstable();
                Answer::ExtensionNumbers(extended, numbers)
            }
            Question::Missing => Answer::Error(
                Code::InvalidArgument,
                "the request sets no message_request".to_owned(),
            ),
        }
    }

    /// File `name` (always), then its transitive dependencies not in
    /// `sent`, which gains them all; `None` if `name` is unknown.
    fn files_from(&self, name: &str, sent: &mut HashSet<String>) -> Option<Answer> {
        let first = self.files.get(name)?;
        sent.insert(name.to_owned());
        let mut files = vec![first.raw.to_vec()];
        let mut queue: Vec<&str> = first.dependencies.iter().map(String::as_str).collect();
        while let Some(next) = queue.pop() {
            // A dependency streamhub does not know is left to the client.
            let Some(file) = self.files.get(next) else {
                continue;
            };
            if !sent.insert(next.to_owned()) {
                continue;
            }
            files.push(file.raw.to_vec());
            queue.extend(file.dependencies.iter().map(String::as_str));
        }
        Some(Answer::Files(files))
    }
}

/// `scope.name`, or `name` at the top of an unnamed package.
fn qualified(scope: &str, name: &str) -> String {
    if scope.is_empty() {
        name.to_owned()
    } else {
        format!("{scope}.{name}")
    }
}

/// A reflection request, whichever version asked it.
#[derive(Debug)]
enum Question {
    FileByFilename(String),
    FileContainingSymbol(String),
    FileContainingExtension(String, i32),
    AllExtensionNumbersOfType(String),
    ListServices,
    /// No `message_request`.
    Missing,
}

/// A reflection answer, whichever version it goes to.
#[derive(Debug)]
enum Answer {
    /// Encoded `FileDescriptorProto`s.
    Files(Vec<Vec<u8>>),
    /// The base type and its extension numbers.
    ExtensionNumbers(String, Vec<i32>),
    Services(Vec<String>),
    Error(Code, String),
}

/// A stream of answers, as the generated servers take it.
pub type Answers<T> = Pin<Box<dyn futures::Stream<Item = Result<T, Status>> + Send>>;

/// The reflection service over a fixed set of descriptors; serve it with
/// [`Reflection::v1`] and [`Reflection::v1alpha`].
#[derive(Debug, Clone)]
pub struct Reflection {
    index: Arc<Index>,
    shutdown: Shutdown,
}

impl Reflection {
    /// Reflection over the encoded `FileDescriptorSet`s in `sets` (the
    /// first registration of a file name wins); its streams end when
    /// `shutdown` is triggered.
    ///
    /// # Errors
    /// A set, or a file in it, that does not decode, or a file without a
    /// name.
    pub fn new(sets: &[&[u8]], shutdown: Shutdown) -> Result<Self, ReflectionError> {
        let mut index = Index::default();
        for set in sets {
            index.register(set)?;
        }
        Ok(Self {
            index: Arc::new(index),
            shutdown,
        })
    }

    /// Answers each request of `requests` in turn until the client closes
    /// its side, a request cannot be read, or the server shuts down.
    fn serve<Q, A>(
        &self,
        mut requests: Streaming<Q>,
        reply: fn(&Index, Q, &mut HashSet<String>) -> A,
    ) -> Answers<A>
    where
        Q: Send + 'static,
        A: Send + 'static,
    {
        enum Next<Q> {
            Request(Q),
            Closed,
            Failed(Status),
            ShuttingDown,
        }
        let index = Arc::clone(&self.index);
        let shutdown = self.shutdown.clone();
        Box::pin(async_stream::stream! {
            let mut sent = HashSet::new();
            let mut received = 0u64;
            loop {
                let next = tokio::select! {
                    biased;
                    () = shutdown.cancelled() => Next::ShuttingDown,
                    next = requests.message() => match next {
                        Ok(Some(request)) => Next::Request(request),
                        Ok(None) => Next::Closed,
                        Err(status) => Next::Failed(status),
                    },
                };
                match next {
                    Next::Request(request) => {
                        received += 1;
                        yield Ok(reply(&index, request, &mut sent));
                    }
                    Next::Closed => return,
                    Next::Failed(status) => {
                        // The message keeps tonic's words (StatusLayer
                        // recognises an oversized message by them).
                        yield Err(Status::new(
                            status.code(),
                            format!(
                                "reflection request {} could not be read: {}",
                                received + 1,
                                status.message()
                            ),
                        ));
                        return;
                    }
                    Next::ShuttingDown => {
                        yield Err(shutting_down());
                        return;
                    }
                }
            }
        })
    }
}

/// The service of one version of the reflection protocol: the same
/// conversation over that version's generated types.
macro_rules! reflection_version {
    ($version:ident, $doc:literal) => {
        #[doc = $doc]
        pub mod $version {
            use std::collections::HashSet;

            use tonic::{Request, Response, Status, Streaming};
            use tonic_reflection::pb::$version::{
                ErrorResponse, ExtensionNumberResponse, FileDescriptorResponse,
                ListServiceResponse, ServerReflectionRequest, ServerReflectionResponse,
                ServiceResponse,
                server_reflection_request::MessageRequest,
                server_reflection_response::MessageResponse,
                server_reflection_server::{ServerReflection, ServerReflectionServer},
            };

            use super::{Answer, Answers, Index, Question, Reflection};

            /// The generated server's handler.
            #[derive(Debug, Clone)]
            pub struct Service(Reflection);

            impl Reflection {
                #[doc = concat!("This version's server (`grpc.reflection.", stringify!($version), ".ServerReflection`), taking requests of up to `max_message_size` bytes.")]
                pub fn $version(&self, max_message_size: usize) -> ServerReflectionServer<Service> {
                    ServerReflectionServer::new(Service(self.clone()))
                        .max_decoding_message_size(max_message_size)
                        .max_encoding_message_size(max_message_size)
                }
            }

            #[tonic::async_trait]
            impl ServerReflection for Service {
                type ServerReflectionInfoStream = Answers<ServerReflectionResponse>;

                async fn server_reflection_info(
                    &self,
                    request: Request<Streaming<ServerReflectionRequest>>,
                ) -> Result<Response<Self::ServerReflectionInfoStream>, Status> {
                    Ok(Response::new(self.0.serve(request.into_inner(), reply)))
                }
            }

            fn reply(
                index: &Index,
                request: ServerReflectionRequest,
                sent: &mut HashSet<String>,
            ) -> ServerReflectionResponse {
                let question = match &request.message_request {
                    Some(MessageRequest::FileByFilename(name)) => {
                        Question::FileByFilename(name.clone())
                    }
                    Some(MessageRequest::FileContainingSymbol(symbol)) => {
                        Question::FileContainingSymbol(symbol.clone())
                    }
                    Some(MessageRequest::FileContainingExtension(extension)) => {
                        Question::FileContainingExtension(
                            extension.containing_type.clone(),
                            extension.extension_number,
                        )
                    }
                    Some(MessageRequest::AllExtensionNumbersOfType(extended)) => {
                        Question::AllExtensionNumbersOfType(extended.clone())
                    }
                    Some(MessageRequest::ListServices(_)) => Question::ListServices,
                    None => Question::Missing,
                };
                let response = match index.answer(question, sent) {
                    Answer::Files(file_descriptor_proto) => {
                        MessageResponse::FileDescriptorResponse(FileDescriptorResponse {
                            file_descriptor_proto,
                        })
                    }
                    Answer::ExtensionNumbers(base_type_name, extension_number) => {
                        MessageResponse::AllExtensionNumbersResponse(ExtensionNumberResponse {
                            base_type_name,
                            extension_number,
                        })
                    }
                    Answer::Services(names) => {
                        MessageResponse::ListServicesResponse(ListServiceResponse {
                            service: names
                                .into_iter()
                                .map(|name| ServiceResponse { name })
                                .collect(),
                        })
                    }
                    Answer::Error(code, error_message) => {
                        MessageResponse::ErrorResponse(ErrorResponse {
                            error_code: code as i32,
                            error_message,
                        })
                    }
                };
                ServerReflectionResponse {
                    valid_host: request.host.clone(),
                    original_request: Some(request),
                    message_response: Some(response),
                }
            }
        }
    };
}

reflection_version!(v1, "`grpc.reflection.v1.ServerReflection`.");
reflection_version!(v1alpha, "`grpc.reflection.v1alpha.ServerReflection`.");

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn index() -> Index {
        let mut index = Index::default();
        for set in [
            crate::proto::FILE_DESCRIPTOR_SET,
            tonic_health::pb::FILE_DESCRIPTOR_SET,
        ] {
            index.register(set).unwrap();
        }
        index
    }

    fn file_names(answer: Answer) -> Vec<String> {
        let Answer::Files(files) = answer else {
            panic!("expected files: {answer:?}");
        };
        files
            .iter()
            .map(|raw| {
                prost_types::FileDescriptorProto::decode(&raw[..])
                    .unwrap()
                    .name()
                    .to_owned()
            })
            .collect()
    }

    #[test]
    fn symbols_of_every_kind_are_found() {
        let index = index();
        for symbol in [
            "telemetry.TelemetryService",
            "telemetry.TelemetryService.LiveFeed",
            "telemetry.MetricsRequest",
            "telemetry.MetricsRequest.interval_ms",
            "chat.MessageKind",
            "grpc.health.v1.HealthCheckResponse.ServingStatus",
            "grpc.health.v1.HealthCheckResponse.SERVING",
        ] {
            assert!(index.symbols.contains_key(symbol), "{symbol}");
        }
        assert!(index.messages.contains("grpc.health.v1.HealthCheckRequest"));
    }

    #[test]
    fn a_dependency_is_sent_once_per_stream_and_the_file_asked_for_always() {
        let mut index = Index::default();
        let file = |name: &str, deps: &[&str]| prost_types::FileDescriptorProto {
            name: Some(name.to_owned()),
            dependency: deps.iter().map(|d| (*d).to_owned()).collect(),
            ..Default::default()
        };
        let set = prost_types::FileDescriptorSet {
            file: vec![
                file("a.proto", &["b.proto", "unknown.proto"]),
                file("b.proto", &["c.proto"]),
                file("c.proto", &[]),
            ],
        };
        index.register(&set.encode_to_vec()).unwrap();
        let mut sent = HashSet::new();
        let ask = |name: &str| Question::FileByFilename(name.to_owned());
        assert_eq!(
            file_names(index.answer(ask("a.proto"), &mut sent)),
            ["a.proto", "b.proto", "c.proto"]
        );
        assert_eq!(
            file_names(index.answer(ask("b.proto"), &mut sent)),
            ["b.proto"]
        );
        let Answer::Error(code, _) = index.answer(ask("unknown.proto"), &mut sent) else {
            panic!("unknown");
        };
        assert_eq!(code, Code::NotFound);
    }
}
