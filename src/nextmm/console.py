"""`nextmm chat`: a conversation with a model in the terminal, its replies printed as they are decoded.

A line is a message; `/image PATH` and `/video DIR` attach a picture or a video (a folder of frames, or frame files
separated by commas) to the next message. Drawings are saved as PNG files and their paths printed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable

from nextmm.api import NextMM, _picture
from nextmm.chat import ContextFull
from nextmm.errors import UserError
from nextmm.train.checkpoint import write_file_atomically

HELP = """commands:
  /image PATH     attach a picture to your next message
  /video DIR      attach a video: a folder of frames, or frame files separated by commas
  /system TEXT    start over with this system message
  /reset          start over
  /quit           leave (so does Ctrl-D)
anything else is your message."""


class Console:
    def __init__(self, m: NextMM, drawings: Path, max_new_tokens: int = 64, system: str = "",
                 say: Callable[[str], None] = lambda text: print(text, end="", flush=True), video_frames=None):
        self.m, self.drawings, self.max_new_tokens, self.say = m, drawings, max_new_tokens, say
        self.video_frames = video_frames
        self.system = system
        self.history: list[dict] = []
        self.attached: list = []
        self.drawn = 0

    def run(self, lines: Iterable[str], prompt: Callable[[], None] = lambda: None) -> None:
        self.say("chatting with the model; /help lists the commands\n")
        prompt()
        for line in lines:
            if not self.handle(line.strip()):
                return
            prompt()

    def handle(self, line: str) -> bool:
        """One line typed; False when it ends the chat."""
        command, _, rest = line.partition(" ")
        try:
            if command == "/quit":
                return False
            if command == "/help":
                self.say(HELP + "\n")
            elif command in ("/reset", "/system"):
                self.system = rest.strip() if command == "/system" else self.system
                self.history, self.attached = [], []
                self.say("(a new conversation)\n")
            elif command == "/image":
                self.attached.append(_picture(Path(rest.strip())))
                self.say(f"(picture attached: {rest.strip()})\n")
            elif command == "/video":
                frames = [_picture(Path(f)) for f in self.video_frames(rest.strip())]
                self.attached.append(frames)
                self.say(f"(video of {len(frames)} frames attached)\n")
            elif command.startswith("/"):
                self.say(f"'{command}' is not a command; /help lists them\n")
            elif line or self.attached:
                self.reply(line)
        except UserError as err:
            self.say(f"error: {err}\n")
        return True

    def reply(self, text: str) -> None:
        message = {"role": "user", "content": [*self.attached, *([text] if text else [])]}
        conversation = ([{"role": "system", "content": self.system}] if self.system else []) + self.history + [message]
        try:
            self.m.prompt_tokens(conversation, self.max_new_tokens)
        except ContextFull as err:
            self.say(f"the conversation is full: {err}. Type /reset to start a new one.\n")
            return
        self.attached = []
        self.say("assistant: ")
        answer: list = []
        for event in self.m.chat(conversation, self.max_new_tokens, stream=True):
            if event.kind == "text":
                self.say(event.text)
            elif event.kind == "image":
                answer.append(event.image)
                self.say(f"[drawing saved to {self.save(event.image)}]")
            elif event.kind == "end":
                self.say("\n" + self.note(event.reply))
                answer = ([event.reply.text] if event.reply.text else []) + answer
        self.history += [message, {"role": "assistant", "content": answer}]

    def note(self, reply) -> str:
        if reply.finish_reason == "length":
            return f"(the reply stopped at {reply.completion_tokens} tokens; --max-new-tokens allows more)\n"
        if reply.finish_reason == "image" and not reply.images:
            if self.m.decoder is None:
                return "(the model began a drawing, but it has no visual decoder to render it)\n"
            return "(the model began a drawing, but the context has no room left for it; /reset starts over)\n"
        return ""

    def save(self, image) -> Path:
        self.drawings.mkdir(parents=True, exist_ok=True)
        while (path := self.drawings / f"drawing-{self.drawn:03d}.png").exists():
            self.drawn += 1
        write_file_atomically(path, lambda tmp: image.save(tmp, format="PNG"))
        self.drawn += 1
        return path
