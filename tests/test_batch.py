"""build_opd_batch: tool tokens masked, prompts repeated n times, over-long samples never silent."""

import pytest
import torch

from opd.batch import (
    OverlengthError,
    build_opd_batch,
    micro_batch_rows,
    response_logit_rows,
    response_token_ids,
)


def _t(*values):
    return torch.tensor(values, dtype=torch.long)


def test_tool_tokens_stay_in_the_sequence_but_out_of_the_loss():
    # model tokens 5 6, tool output 90 91 92, model tokens 7 8
    response = _t(5, 6, 90, 91, 92, 7, 8)
    mask = _t(1, 1, 0, 0, 0, 1, 1)
    batch = build_opd_batch(responses=[response], response_mask=[mask], prompts=[_t(1, 2, 3)])
    assert batch.input_ids[0].tolist() == [1, 2, 3, 5, 6, 90, 91, 92, 7, 8]
    assert batch.loss_mask[0].tolist() == [1, 1, 0, 0, 0, 1, 1]
    assert batch.num_loss_tokens() == 4


def test_logit_rows_predict_each_response_token():
    batch = build_opd_batch(
        responses=[_t(5, 6), _t(7, 8, 9)], response_mask=[_t(1, 1), _t(1, 0, 1)], prompts=[_t(1, 2, 3), _t(4)]
    )
    packed = torch.cat(batch.input_ids)
    rows = response_logit_rows(batch)
    # the logit at row r predicts packed token r + 1
    assert packed[rows + 1].tolist() == response_token_ids(batch).tolist() == [5, 6, 7, 8, 9]
    # without remove-padding: every sample right-padded to one width, rows B * width
    width = 6
    padded = torch.zeros(len(batch), width, dtype=torch.long)
    for i, ids in enumerate(batch.input_ids):
        padded[i, : ids.numel()] = ids
    rows = response_logit_rows(batch, row_width=width)
    assert padded.reshape(-1)[rows + 1].tolist() == [5, 6, 7, 8, 9]


def test_rollout_n_repeats_each_prompt_for_its_responses():
    prompts = [_t(1), _t(2, 2)]
    responses = [_t(10 + i) for i in range(6)]
    masks = [_t(1)] * 6
    batch = build_opd_batch(responses=responses, response_mask=masks, prompts=prompts, rollout_n=3)
    assert [ids[:-1].tolist() for ids in batch.input_ids] == [[1], [1], [1], [2, 2], [2, 2], [2, 2]]
    with pytest.raises(ValueError, match="rollout.n=2"):
        build_opd_batch(responses=responses, response_mask=masks, prompts=prompts, rollout_n=2)


def test_overlength_is_truncated_and_counted_or_an_error():
    kwargs = dict(
        responses=[_t(5, 6, 7, 8), _t(9)], response_mask=[_t(1, 1, 1, 1), _t(1)], prompts=[_t(1, 2)] * 2
    )
    batch = build_opd_batch(max_length=4, **kwargs)
    assert batch.num_truncated == 1
    assert batch.input_ids[0].tolist() == [1, 2, 5, 6]
    assert batch.loss_mask[0].numel() == 2
    with pytest.raises(OverlengthError, match="opd.max_length=4"):
        build_opd_batch(max_length=4, overlength="error", **kwargs)


def test_raw_prompt_fallback_templates_the_prompt_only_and_keeps_tool_tokens():
    class Template:
        def apply_chat_template(self, messages, add_generation_prompt, tokenize):
            assert add_generation_prompt and tokenize
            return [100 + len(m["content"]) for m in messages] + [99]

    messages = [[{"role": "user", "content": "abc"}]]
    response, mask = _t(5, 90, 6), _t(1, 0, 1)
    batch = build_opd_batch(
        responses=[response], response_mask=[mask], raw_prompts=messages, tokenizer=Template()
    )
    assert batch.input_ids[0].tolist() == [103, 99, 5, 90, 6]
    assert batch.loss_mask[0].tolist() == [1, 0, 1]


def test_mismatched_inputs_are_rejected():
    with pytest.raises(ValueError, match="mask"):
        build_opd_batch(responses=[_t(1, 2)], response_mask=[_t(1)], prompts=[_t(3)])
    with pytest.raises(ValueError, match="empty prompt"):
        build_opd_batch(responses=[_t(1)], response_mask=[_t(1)], prompts=[_t()])
    with pytest.raises(ValueError, match="pre-tokenized prompts or raw_prompts"):
        build_opd_batch(responses=[_t(1)], response_mask=[_t(1)])


def test_zero_weight_copy_keeps_shapes_and_drops_the_loss():
    batch = build_opd_batch(responses=[_t(5, 6)], response_mask=[_t(1, 1)], prompts=[_t(1)])
    filler = batch.zero_weight_copy()
    assert [t.tolist() for t in filler.input_ids] == [t.tolist() for t in batch.input_ids]
    assert filler.num_loss_tokens() == 0 and batch.num_loss_tokens() == 2


def test_micro_batch_rows_cover_every_row_once():
    assert [list(r) for r in micro_batch_rows(5, 2)] == [[0, 1], [2, 3], [4]]
    with pytest.raises(ValueError):
        micro_batch_rows(5, 0)


def test_per_token_fields_follow_their_own_rows_and_truncation():
    logp = [torch.tensor([-0.5, -0.25, -0.125]), torch.tensor([-1.0])]
    batch = build_opd_batch(
        responses=[_t(5, 6, 7), _t(8)],
        response_mask=[_t(1, 1, 1), _t(1)],
        prompts=[_t(1), _t(1, 2)],
        rollout_log_probs=logp,
        advantages=[torch.ones(3), -torch.ones(1)],
        max_length=3,
    )
    # sample 0 keeps 2 of its 3 tokens (prompt 1 + 2 = 3): its log-probs are cut the same way
    assert [r.tolist() for r in batch.rollout_logp] == [[-0.5, -0.25], [-1.0]]
    assert [r.tolist() for r in batch.select([1]).advantages] == [[-1.0]]
    with pytest.raises(ValueError, match="sample 1: response has 1 tokens, rollout_log_probs 2"):
        build_opd_batch(
            responses=[_t(5), _t(8)],
            response_mask=[_t(1), _t(1)],
            prompts=[_t(1), _t(2)],
            rollout_log_probs=[torch.zeros(1), torch.zeros(2)],
        )


def test_teacher_prompts_of_other_lengths_read_exactly_the_students_response():
    # per-row teacher prompts longer and shorter than the student's; one response with tool tokens
    responses, masks = [_t(5, 90, 6), _t(7, 8)], [_t(1, 0, 1), _t(1, 1)]
    batch = build_opd_batch(
        responses=responses,
        response_mask=masks,
        prompts=[_t(1, 2), _t(3, 4, 4)],
        teacher_prompts=[_t(11, 12, 13, 14, 15), _t(16)],
    )
    view = batch.teacher_view()
    assert [ids.tolist() for ids in view.input_ids] == [[11, 12, 13, 14, 15, 5, 90, 6], [16, 7, 8]]
    assert view.prompt_lengths.tolist() == [5, 1]
    # the teacher's response positions hold the student's response tokens, row for row
    packed = torch.cat(view.input_ids)
    assert packed[response_logit_rows(view) + 1].tolist() == response_token_ids(batch).tolist()
    assert response_token_ids(view).tolist() == [5, 90, 6, 7, 8]
    assert [m.tolist() for m in view.loss_mask] == [[1, 0, 1], [1, 1]]
    # micro-batches carry each row's own teacher prompt
    second = batch.select([1]).teacher_view()
    assert second.input_ids[0].tolist() == [16, 7, 8] and second.prompt_lengths.tolist() == [1]
    assert batch.zero_weight_copy().teacher_view().num_loss_tokens() == 0


def test_teacher_prompts_repeat_with_rollout_n():
    batch = build_opd_batch(
        responses=[_t(5), _t(6), _t(7), _t(8)],
        response_mask=[_t(1)] * 4,
        prompts=[_t(1), _t(2)],
        teacher_prompts=[_t(9, 9), _t(10, 10, 10)],
        rollout_n=2,
    )
    view = batch.teacher_view()
    assert [ids.tolist() for ids in view.input_ids] == [
        [9, 9, 5],
        [9, 9, 6],
        [10, 10, 10, 7],
        [10, 10, 10, 8],
    ]


def test_same_teacher_prompt_gives_the_student_batch():
    batch = build_opd_batch(responses=[_t(5, 6)], response_mask=[_t(1, 1)], prompts=[_t(1, 2)])
    view = batch.teacher_view()
    assert [t.tolist() for t in view.input_ids] == [t.tolist() for t in batch.input_ids]
    assert view.prompt_lengths.tolist() == batch.prompt_lengths.tolist()
    assert response_logit_rows(view).tolist() == response_logit_rows(batch).tolist()


def test_max_length_counts_the_longer_prompt_and_cuts_both_sides_alike():
    common = dict(
        responses=[_t(5, 6, 7, 8), _t(9, 10)],
        response_mask=[_t(1, 1, 1, 1), _t(1, 1)],
        prompts=[_t(1, 2), _t(1, 2, 3, 4)],
        rollout_log_probs=[torch.zeros(4), torch.zeros(2)],
    )
    # row 0: teacher prompt 4 > student 2, so 6 - 4 = 2 response tokens fit on both sides;
    # row 1: the student's prompt (4) is the longer one and 4 + 2 fits exactly
    batch = build_opd_batch(teacher_prompts=[_t(20, 21, 22, 23), _t(24)], max_length=6, **common)
    assert batch.num_truncated == 1
    assert batch.input_ids[0].tolist() == [1, 2, 5, 6]
    assert batch.teacher_view().input_ids[0].tolist() == [20, 21, 22, 23, 5, 6]
    assert batch.loss_mask[0].numel() == 2 and batch.rollout_logp[0].numel() == 2
    assert batch.teacher_view().input_ids[1].tolist() == [24, 9, 10]
    # without the teacher prompts the same row is not cut
    assert build_opd_batch(max_length=6, **common).num_truncated == 0
    with pytest.raises(OverlengthError, match="sample 0: teacher prompt 4 \\+ response 4"):
        build_opd_batch(
            teacher_prompts=[_t(20, 21, 22, 23), _t(24)], max_length=6, overlength="error", **common
        )
    with pytest.raises(OverlengthError, match="the teacher prompt alone \\(6\\)"):
        build_opd_batch(teacher_prompts=[_t(*range(6)), _t(24)], max_length=6, **common)


def test_bad_teacher_prompts_are_rejected():
    common = dict(responses=[_t(5)], response_mask=[_t(1)], prompts=[_t(1)])
    with pytest.raises(ValueError, match="sample 0: empty teacher prompt"):
        build_opd_batch(teacher_prompts=[_t()], **common)
    with pytest.raises(ValueError, match="2 prompts do not match 1 responses"):
        build_opd_batch(teacher_prompts=[_t(1), _t(2)], **common)


def test_teacher_rows_whose_response_differs_are_an_error():
    batch = build_opd_batch(
        responses=[_t(5, 6)], response_mask=[_t(1, 1)], prompts=[_t(1)], teacher_prompts=[_t(2, 3)]
    )
    batch.teacher_input_ids = [_t(2, 3, 5)]  # one response token short: must never be padded silently
    with pytest.raises(ValueError, match="sample 0: the teacher's response tokens differ.*1 vs 2 tokens"):
        batch.teacher_view()
    batch.teacher_input_ids = [_t(2, 3, 5, 7)]
    with pytest.raises(ValueError, match="differ from the student's"):
        batch.teacher_view()
